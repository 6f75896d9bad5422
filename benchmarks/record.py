"""Recording benchmark runs: JSON + a markdown table, with the command, machine and commit."""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

from cddrec.io import atomic_write_json, atomic_write_text

RESULTS_DIR = Path("benchmarks") / "results"


def cell(value: float | None, fmt: str) -> str:
    """A table cell: ``value`` formatted, or '-' where it is missing (None or NaN), never "nan"."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, fmt)


def git_commit() -> str:
    """HEAD of the checkout this code runs from, with ``+dirty`` for uncommitted changes; ``CDDREC_COMMIT``
    when set (an installed copy has no git metadata: the GPU check sets it from the checkout it built from)."""
    if os.environ.get("CDDREC_COMMIT"):
        return os.environ["CDDREC_COMMIT"]
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results"],  # records written before this one are not code
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            info["memory_gb"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    return info


def user_command(script: str) -> list[str]:
    """How to run ``script`` (``cddrec-train``, ``cddrec-infer``, ...) as a user types it: the console script
    of this install (beside ``sys.executable``), else ``sys.executable -m`` its module, read from this
    install's entry point (never another install's script found on PATH: it may run other code)."""
    beside = Path(sys.executable).with_name(script)
    if beside.exists():
        return [str(beside)]
    from importlib.metadata import entry_points

    eps = {ep.name: ep for ep in entry_points(group="console_scripts")}
    if script not in eps:
        raise LookupError(f"{script} is not a console script of this install: pip install -e . (or the wheel)")
    return [sys.executable, "-m", eps[script].module]


def command_line() -> str:
    prog = Path(sys.argv[0])
    if prog.suffix == ".py" and prog.parent.name == "benchmarks":  # python -m cddrec.benchmarks.NAME
        head = f"python -m cddrec.benchmarks.{prog.stem}"
    else:
        head = prog.name
    return " ".join([head, shlex.join(sys.argv[1:])]).rstrip()  # quoted: the line can be pasted into a shell


def dirty_commits(doc: dict) -> list[str]:
    """The commits of a record (its own and its runs') that carry ``+dirty``: uncommitted changes."""
    runs = doc.get("runs") if isinstance(doc.get("runs"), list) else []  # quality records hold their runs
    commits = [doc.get("commit")] + [r.get("commit") for r in runs if isinstance(r, dict)]
    return sorted({c for c in commits if isinstance(c, str) and c.endswith("+dirty")})


def dirty_note(doc: dict) -> str | None:
    """The line a result's markdown opens with when it was recorded from a tree with uncommitted changes."""
    dirty = dirty_commits(doc)
    if not dirty:
        return None
    return ("> Recorded from a working tree with uncommitted changes (" + ", ".join(f"`{c}`" for c in dirty)
            + "): the code that produced these figures is that commit plus edits that were never committed.")


def record(name: str, payload: dict, table: str, out_dir: str | Path = RESULTS_DIR, command: str | None = None,
           title: str | None = None, meta: dict | None = None) -> tuple[Path, Path]:
    """Write ``NAME.json`` and ``NAME.md`` under ``out_dir``; both carry command, machine, commit, date.

    ``meta`` (those four keys) keeps the provenance of an earlier record when only the table changes."""
    out_dir = Path(out_dir)
    meta = meta or {"command": command or command_line(), "commit": git_commit(), "machine": machine(),
                    "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    doc = {**meta, **payload}
    jpath, mpath = out_dir / f"{name}.json", out_dir / f"{name}.md"
    atomic_write_json(jpath, doc)
    m = meta["machine"]
    note = dirty_note(doc)
    md = [f"# {title or name}", "", *([note, ""] if note else []),
          f"- command: `{meta['command']}`",
          f"- commit: `{meta['commit']}`, date {meta['date']}",
          f"- machine: {m.get('cpu')}, {m.get('cores')} cores" + (f", GPU {m['gpu']}" if m.get("gpu") else "")
          + f"; torch {m.get('torch')}, onnxruntime {m.get('onnxruntime')}", "", table, ""]
    atomic_write_text(mpath, "\n".join(md))
    return jpath, mpath
