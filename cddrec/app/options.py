"""What every command shares: the error policy, one option vocabulary, and small parsers.

One vocabulary across the commands (``cddrec-train``, ``-eval``, ``-export``, ``-infer``,
``-serve``, ``-bench``, ``-demo``):

=====================  ==========================================================
``-o/--output``        the file (or folder) the command writes
``--threads``          CPU threads (0 = every core, at most ``MAX_THREADS_PER_CORE`` x cores)
``--k``                items per user
``--batch-size``       users per engine call (serving) or training windows per step
``--eval-batch-size``  users per evaluation batch
``--device``           auto | cpu | cuda | cuda:N (``auto``: CUDA when present)
=====================  ==========================================================

Spellings of earlier releases (``--out``, ``--num-threads``, ``--topk``, ``--batch-size`` of
``cddrec-eval``) are accepted for one release and hidden from ``--help``.

The exit codes of every command:

=========  ==================================================================================
0          done
1          an error the user can act on, in one line: a bad data, model or request file, an
           output that would replace an input or that another run is writing, a failed write
           (disk full), threads that cannot be started
2          a usage error: an unknown option, a value out of range (``--threads`` above the cap)
3          ``cddrec-infer``: finished, but every line (or shard) was bad: nothing served
4          ``cddrec-infer``: served with problems: more than half of the users got the
           popularity fallback (item keys the model does not know), or some ``--ray`` shards
           failed while the others were written
130 / 143  interrupted by SIGINT / SIGTERM (temporary files removed, no output written)
=========  ==================================================================================
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import os
import sys

import click

from cddrec.errors import CDDRecError
from cddrec.io import install_signal_cleanup, output_lock

CONTEXT = {"max_content_width": 110, "help_option_names": ["-h", "--help"]}
TRAIN_MODULES = ("torch", "onnx", "onnxscript")  # what the [train] extra brings
POSITIVE = click.IntRange(min=1)


class Finite(click.FloatRange):
    """A float range that also refuses nan and inf (``click.FloatRange`` lets them through)."""

    def convert(self, value, param, ctx):
        v = super().convert(value, param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return v


MAX_THREADS_PER_CORE = 4
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOTHING_SERVED, EXIT_PROBLEMS = 0, 1, 2, 3, 4
# what the libraries say when the OS refuses a thread (Python, ONNX Runtime, libgomp, pthreads)
_THREAD_FAILURES = ("can't start new thread", "thread creation failed", "pthread_create", "resource temporarily "
                    "unavailable", "failed to create thread")


class Option(click.Option):
    """An option with spellings kept for one release (``hidden_aliases``): accepted, not shown in --help."""

    def __init__(self, *args, hidden_aliases: tuple[str, ...] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.hidden_aliases = tuple(hidden_aliases)

    def get_help_record(self, ctx):
        shown, self.opts = self.opts, [o for o in self.opts if o not in self.hidden_aliases]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = shown


def option(*names: str, hidden_aliases: tuple[str, ...] = (), **kwargs):
    """``click.option`` whose ``hidden_aliases`` (old spellings) are accepted but not listed in --help."""
    return click.option(*names, *hidden_aliases, cls=Option, hidden_aliases=hidden_aliases, **kwargs)


_COMMAND: contextvars.ContextVar[contextlib.ExitStack | None] = contextvars.ContextVar("cddrec_command",
                                                                                        default=None)


def lock_outputs(*paths, option: str = "output path", make_folder: bool = False) -> None:
    """Hold the lock of these named outputs (``cddrec.io.output_lock``; ``None`` skipped) until the
    command ends: a second run writing one of them is refused from its start, and an output that
    is a directory or whose folder is missing is refused before any work. ``make_folder``: the
    outputs are folders (``cddrec-bench -o``, a Triton repository), created if their parent exists."""
    stack = _COMMAND.get()
    if stack is None:
        raise RuntimeError("lock_outputs is called inside a command wrapped by friendly_errors")
    stack.enter_context(output_lock(*paths, option=option, make_folder=make_folder))


def friendly_errors(fn):
    """Expected errors (bad data, bad model files, bad settings, unwritable outputs, threads that
    cannot start) become one-line messages (exit 1); SIGINT/SIGTERM exit 130/143 after removing
    temporary files. Locks taken with ``lock_outputs`` are released when the command ends."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        install_signal_cleanup()
        try:
            with contextlib.ExitStack() as stack:
                token = _COMMAND.set(stack)
                try:
                    return fn(*args, **kwargs)
                finally:
                    _COMMAND.reset(token)
        except (CDDRecError, ValueError) as e:
            raise click.ClickException(str(e)) from e
        except ModuleNotFoundError as e:  # a serving-only install has no torch/onnx: say what to install
            if (e.name or "").split(".")[0] not in TRAIN_MODULES:
                raise
            raise click.ClickException(f"this command needs {e.name.split('.')[0]}, which a serving-only install "
                                       "lacks: pip install 'cddrec[train]' (cddrec-infer and cddrec-serve serve "
                                       "graphs without it)") from e
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            raise click.ClickException(f"{where}{e.strerror or e}") from e
        except Exception as e:  # noqa: BLE001 - only a failure to start threads is turned into one line
            if not is_thread_failure(e):
                raise
            raise click.ClickException(f"cannot start threads: {_first_line(e)}; lower --threads (or "
                                       "OMP_NUM_THREADS), or free the machine's threads") from e
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


def is_thread_failure(e: BaseException) -> bool:
    """The OS refused a thread (RuntimeError from Python's threading, ONNX Runtime's Fail or
    RuntimeException, whose messages carry libgomp's or pthread's words)."""
    if not (isinstance(e, (RuntimeError, MemoryError)) or type(e).__module__.startswith("onnxruntime")):
        return False
    text = str(e).lower()
    return any(w in text for w in _THREAD_FAILURES)


def _first_line(e: BaseException) -> str:
    """The line of the message that says what failed (libraries wrap it in context lines)."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    said = [x for x in lines if any(w in x.lower() for w in _THREAD_FAILURES)]
    return ((said or lines or [type(e).__name__])[0])[:200]


# ------------------------------------------------------------------------ the vocabulary
def max_threads() -> int:
    return MAX_THREADS_PER_CORE * (os.cpu_count() or 1)


def threads_option(default: int = 0, help_: str = "CPU threads (0 = every core)"):
    return option("--threads", type=click.IntRange(0, max_threads()), default=default, show_default=True,
                  help=f"{help_}; at most {MAX_THREADS_PER_CORE} x the cores ({max_threads()})")


def progress_every_option():
    return option("--progress-every", default=30.0, show_default=True, type=Finite(0, min_open=True),
                  help="seconds between progress lines when stderr is not a terminal (logs, CI, nohup)")


def k_option(default: int | None, help_: str = "items per user", **kwargs):
    return option("--k", type=POSITIVE, default=default, show_default=default is not None, help=help_, **kwargs)


def device_option(default: str = "auto"):
    return option("--device", default=default, show_default=True,
                  help="auto (CUDA when present, else the CPU) | cpu | cuda | cuda:N")


def data_options(fn):
    """Columns of CSV/TSV/Parquet interaction logs (training, evaluation and cddrec-infer alike)."""
    opts = [
        option("--user-col", default="user", show_default=True, help="user column of CSV/TSV/Parquet logs"),
        option("--item-col", default="item", show_default=True, help="item column of logs"),
        option("--time-col", default="timestamp", show_default=True,
               help="timestamp column of logs ('' = file order is time order)"),
        option("--sep", default=None, help="CSV field separator [default: ',' or tab for .tsv]"),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def data_kwargs(user_col, item_col, time_col, sep) -> dict:
    return {"user_col": user_col, "item_col": item_col, "time_col": time_col or None, "sep": sep}


def echo_err(message: str) -> None:
    click.echo(message, err=True)
