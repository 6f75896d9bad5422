"""Every file a command writes goes through here: atomic files, special files, one lock per output.

- A regular path (or a new one) is written to a hidden temporary file beside it,
  ``.NAME.HOST.PID.XXXXXXXX.tmp``, renamed onto it on success: a crash, a failed validation, a
  full disk or a signal never leaves a truncated file that looks complete and never replaces what
  was there. SIGTERM/SIGINT remove the temporary file; after a ``kill -9`` it stays until the next
  write of the same output, which removes the temporary files of that output whose writer (the
  PID in the name, on this host) is gone. A new file gets the permissions ``open()`` would give
  it (the umask), a replaced one keeps its mode; a symbolic link is written through (its target is
  replaced, the link stays).
- ``-`` (stdout), ``/dev/stdout``, ``/dev/stderr``, ``/dev/fd/N``, a character device
  (``/dev/null``) or a FIFO is written straight through: never renamed over, no temporary file
  beside it. A path-based writer (``atomic_path``) writes a private spool file in the temporary
  folder and copies it to the stream once complete, so a failed write sends nothing.
- A directory, a socket, a block device or any other non-regular path is refused with one line.
- ``output_lock`` is the one lock of a named output (``.NAME.lock`` beside it, holding the PID):
  a second run writing the same output is refused while the first runs; ``flock`` is released by
  the kernel when its process dies, so a run killed with ``kill -9`` leaves nothing that blocks
  the next one. It also refuses an output whose folder does not exist.
- A write that fails (disk full, file-size limit, permissions) is an ``OutputError`` naming the
  file that failed, once. ``refuse_overwrite_inputs`` is the one check that no output of a
  command is one of its inputs (same path, symlink or hard link).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import stat
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

from .errors import OutputError

STDOUT = "-"
# temporary files being written right now; removed by the signal handler (see install_signal_cleanup)
_LIVE: set[Path] = set()
_FD_PATHS = {"/dev/stdout": 1, "/dev/stderr": 2}
_FD_PATTERN = re.compile(r"^/(?:dev/fd|proc/self/fd)/(\d+)$")


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------------- what an output path is
@dataclass(frozen=True)
class OutputTarget:
    """An output path and how it is written: ``file`` (temporary file + rename), ``stream`` (a FIFO
    or character device, opened and written straight through) or ``fd`` (an open descriptor:
    stdout for ``-``)."""

    path: Path
    kind: str
    fd: int | None = None

    @property
    def is_file(self) -> bool:
        return self.kind == "file"

    @property
    def name(self) -> str:
        return "stdout" if self.fd == 1 else "stderr" if self.fd == 2 else str(self.path)


def output_target(path: str | Path) -> OutputTarget:
    """How ``path`` is written; an ``OutputError`` for a directory, socket or other non-regular path."""
    text = str(path)
    if text == STDOUT:
        return OutputTarget(Path(STDOUT), "fd", 1)
    m = _FD_PATTERN.match(text)
    if text in _FD_PATHS or m:
        return OutputTarget(Path(text), "fd", _FD_PATHS.get(text) or int(m.group(1)))
    p = Path(path)
    try:
        mode = os.stat(p).st_mode  # follows symbolic links
    except FileNotFoundError:
        return OutputTarget(p, "file")  # a new file (or a dangling link, written through)
    except OSError as e:
        raise OutputError(f"{path}: cannot write: {e.strerror or e}") from None
    if stat.S_ISREG(mode):
        return OutputTarget(p, "file")
    if stat.S_ISCHR(mode) or stat.S_ISFIFO(mode):
        return OutputTarget(p, "stream")
    what = ("a directory" if stat.S_ISDIR(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a block device" if stat.S_ISBLK(mode) else "not a regular file")
    raise OutputError(f"{path}: is {what}; an output is a file path, '-' (stdout), a FIFO or a character device")


def _target(path: Path) -> Path:
    """The file to replace: the final target of a symbolic link, else ``path`` itself."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def host_tag() -> str:
    """This host's name as it appears in temporary file names (letters, digits and '-')."""
    return re.sub(r"[^A-Za-z0-9-]", "", socket.gethostname())[:32] or "host"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def remove_stale_temps(path: str | Path) -> list[Path]:
    """Remove the temporary files of ``path`` (``.NAME.HOST.PID.XXXXXXXX.tmp``) left by a writer on
    this host that is gone (``kill -9``, power loss); returns what was removed."""
    target = _target(Path(path))
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.([A-Za-z0-9-]+)\.(\d+)\.[a-z0-9_]{{8}}\.tmp$")
    host, removed = host_tag(), []
    try:
        names = os.listdir(target.parent)
    except OSError:
        return removed
    for n in names:
        m = pattern.match(n)
        if m and m.group(1) == host and int(m.group(2)) != os.getpid() and not pid_alive(int(m.group(2))):
            with contextlib.suppress(OSError):
                os.unlink(target.parent / n)
                removed.append(target.parent / n)
    return removed


# ------------------------------------------------------------------------------- writing
def _write_error(path, e: OSError, file: bool) -> OutputError:
    return OutputError(f"{path}: cannot write: {e.strerror or e}" + ("; nothing was written" if file else ""))


def _blame(path, e: BaseException, tmp: Path | None, file: bool) -> BaseException:
    """The error to raise for ``e`` raised while writing ``path``: an OutputError already naming a
    file, or an OSError about another file, is kept; any other OSError names ``path``."""
    if isinstance(e, OutputError) or not isinstance(e, OSError):
        return e
    if e.filename and str(e.filename) not in (str(tmp), str(path)):
        return e
    return _write_error(path, e, file)


class NamedFile:
    """A file object whose OS errors (a full disk on write, flush or close) name the output."""

    def __init__(self, f: IO, name: str, file: bool):
        self._f, self._name, self._file = f, name, file

    def _call(self, method: str, *args):
        try:
            return getattr(self._f, method)(*args)
        except OutputError:
            raise
        except OSError as e:
            raise _write_error(self._name, e, self._file) from None

    def write(self, data):
        return self._call("write", data)

    def flush(self):
        return self._call("flush")

    def close(self):
        return self._call("close")

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
            return
        with contextlib.suppress(Exception):  # the body's own error is the one to report
            self._f.close()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a path to write; on success it becomes ``path``.

    A regular ``path``: a temporary file beside it, renamed onto it (missing folders are created:
    internal layouts; a command checks its named outputs with ``output_lock``). A stream (``-``, a
    FIFO, a character device): a private spool file, copied to the stream once complete. An OS
    error while writing becomes an ``OutputError`` naming ``path``; the temporary file is removed
    and ``path`` is left as it was."""
    out = output_target(path)
    if not out.is_file:
        with _spooled(out) as tmp:
            yield tmp
        return
    path = out.path
    target = _target(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(target)
        mode = stat.S_IMODE(target.stat().st_mode) if target.exists() else 0o666 & ~current_umask()
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{host_tag()}.{os.getpid()}.", suffix=".tmp",
                                   dir=target.parent)
    except OSError as e:
        raise OutputError(f"{path}: cannot write: {e.strerror or e}") from None
    tmp = Path(tmp)
    _LIVE.add(tmp)
    try:
        os.close(fd)
        try:
            yield tmp
            os.chmod(tmp, mode)
            os.replace(tmp, target)
        except BaseException as e:
            err = _blame(path, e, tmp, True)
            if err is e:
                raise
            raise err from None
    finally:
        _LIVE.discard(tmp)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def _spooled(out: OutputTarget) -> Iterator[Path]:
    """A private temporary file, copied to the stream ``out`` when the body succeeds."""
    fd, tmp = tempfile.mkstemp(prefix="cddrec-spool-", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    _LIVE.add(tmp)
    try:
        try:
            yield tmp
        except BaseException as e:
            err = _blame(out.name, e, tmp, False)
            if err is e:
                raise
            raise err from None
        with open(tmp, "rb") as src, _open_stream(out, "wb") as dst:
            try:
                shutil.copyfileobj(src, dst, 1 << 20)
            except OSError as e:
                raise _write_error(out.name, e, False) from None
    finally:
        _LIVE.discard(tmp)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _open_stream(out: OutputTarget, mode: str, **kwargs) -> IO:
    try:
        if out.fd is not None:
            for f in (sys.stdout, sys.stderr):  # what Python buffered for this descriptor goes first
                with contextlib.suppress(Exception):
                    if f.fileno() == out.fd:
                        f.flush()
            return open(out.fd, mode, closefd=False, **kwargs)
        return open(out.path, mode, **kwargs)
    except OSError as e:
        raise _write_error(out.name, e, False) from None


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs) -> Iterator[IO]:
    """A file object to write ``path`` with (``mode`` "w" or "wb"): a temporary file renamed onto a
    regular path on success, or the stream itself (``-``, a FIFO, a device), written straight
    through. Its OS errors name ``path``."""
    out = output_target(path)
    if out.is_file:
        with atomic_path(out.path) as tmp:
            with NamedFile(open(tmp, mode, **kwargs), str(path), True) as f:
                yield f
        return
    with NamedFile(_open_stream(out, mode, **kwargs), out.name, False) as f:
        yield f


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json_dumps(obj, indent=2) + "\n")


@contextlib.contextmanager
def atomic_folder(target: str | Path) -> Iterator[Path]:
    """Yield a new empty folder beside ``target``; on success it replaces ``target`` whole (renamed into
    place; an existing ``target`` is renamed aside first, put back if the rename fails, removed after).
    On failure or a signal nothing changes and the staged folder is removed. OS errors become an
    ``OutputError`` naming ``target``. The folder-sized ``atomic_path``: a Triton model folder, a demo run."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    except OSError as e:
        raise OutputError(f"{target}: cannot write: {e.strerror or e}") from None
    _LIVE.add(stage)
    try:
        yield stage
        os.chmod(stage, 0o777 & ~current_umask())  # mkdtemp's 0o700: the folder gets what mkdir would give
        old = None
        if target.exists() or target.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.rename(target, old / target.name)
        try:
            os.rename(stage, target)
        except OSError:
            if old is not None:
                os.rename(old / target.name, target)  # put the previous folder back
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        raise OutputError(f"{target}: cannot write: {e.strerror or e}; nothing was written") from None
    finally:
        _LIVE.discard(stage)
        shutil.rmtree(stage, ignore_errors=True)


def json_safe(obj):
    """``obj`` with every NaN or infinite float replaced by None (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def json_dumps(obj, **kwargs) -> str:
    """Strict JSON: NaN and infinities become null, never the invalid bare ``NaN``."""
    return json.dumps(json_safe(obj), allow_nan=False, **kwargs)


# ---------------------------------------------------------------------------------- the lock
def lock_path(path: str | Path) -> Path:
    target = _target(Path(path))
    return target.with_name(f".{target.name}.lock")


@contextlib.contextmanager
def output_lock(*paths: str | Path | None, option: str = "output path", make_folder: bool = False) -> Iterator[None]:
    """Hold the lock of each named output (``None`` and streams are skipped) for the whole command.

    Each output is checked first: a directory, socket or other non-regular path is refused, as is
    a folder that does not exist (``make_folder``: the output is itself a folder, created here,
    whose parent must exist). A second run writing the same output is refused while the first
    holds the lock; the kernel releases it when its process dies, so a killed run never blocks
    the next one, which also removes the killed run's temporary files."""
    with contextlib.ExitStack() as stack:
        for p in paths:
            if p is None or str(p) == "":
                continue
            if make_folder:
                stack.enter_context(_folder_lock(Path(p), option))
                continue
            out = output_target(p)
            if not out.is_file:
                continue
            parent = _target(out.path).parent
            if not parent.is_dir():
                raise OutputError(f"{p}: the folder {parent} does not exist; create it first or choose "
                                  f"another {option}")
            stack.enter_context(_flock(out.path, option))
        yield


@contextlib.contextmanager
def _folder_lock(folder: Path, option: str) -> Iterator[None]:
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: {option} is a folder here, and this is a file")
    if not folder.parent.is_dir():
        raise OutputError(f"{folder}: the folder {folder.parent} does not exist; create it first or choose "
                          f"another {option}")
    created = not folder.exists()
    try:
        folder.mkdir(exist_ok=True)
    except OSError as e:
        raise OutputError(f"{folder}: cannot create the folder: {e.strerror or e}") from None
    try:
        with _flock(folder, option):
            yield
    except BaseException:
        if created:  # a failed run leaves no trace: the folder it made goes, if still empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


@contextlib.contextmanager
def _flock(path: Path, option: str) -> Iterator[None]:
    lock = lock_path(path)
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as e:
            raise OutputError(f"{path}: cannot write: {e.strerror or e} (creating the lock {lock})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _holder(fd)
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise OutputError(f"{path}: another run is writing this output (lock {lock}{holder}); wait for "
                                  f"it to finish or choose another {option}") from None
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):  # no locks on this filesystem
                yield
                return
            raise OutputError(f"{path}: cannot lock {lock}: {e.strerror or e}") from None
        try:  # the holder before us may have removed the file it locked: lock the current one
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {host_tag()}\n".encode())
    except OSError:
        pass  # the PID is for people; the lock holds without it
    remove_stale_temps(path)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return f", held by pid {int(os.pread(fd, 64, 0).split()[0])}"
    return ""


# ------------------------------------------------------------------ inputs and outputs
def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def refuse_overwrite_inputs(outputs: dict[str, str | Path | None], inputs: dict[str, str | Path | None]) -> None:
    """An ``OutputError`` when an output would replace an input (same path, a symlink to it or a
    hard link of it) or two outputs are the same file. Keys name the options in the message.
    Streams (``-``, devices, FIFOs) are never replaced and are not compared."""
    streams: dict[str, str] = {}
    for n, p in outputs.items():
        if p and not _is_file_output(p):
            t = output_target(p)
            key = f"fd{t.fd}" if t.fd is not None else os.path.realpath(t.path)
            if key in streams and not _is_null(t.path):
                raise OutputError(f"{p}: given as two outputs ({streams[key]} and {n}); their lines would mix, "
                                  "choose different paths")
            streams[key] = n
    outs = [(n, Path(p)) for n, p in outputs.items() if p and _is_file_output(p)]
    ins = [(n, Path(p)) for n, p in inputs.items() if p]
    for i, (oname, o) in enumerate(outs):
        for iname, p in ins:
            if _same_file(o, p):
                raise OutputError(f"{o}: the output ({oname}) is the input {iname} ({p}); refusing to overwrite "
                                  "it, choose another output path")
        for oname2, o2 in outs[i + 1:]:
            if _same_file(o, o2):
                raise OutputError(f"{o}: given as two outputs ({oname} and {oname2}); choose different paths")


def _is_null(path: Path) -> bool:
    """A null device (1, 3): what is written there is discarded, so it may take several outputs."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)


def _is_file_output(p) -> bool:
    try:
        return output_target(p).is_file
    except OutputError:
        return True  # a directory or socket: refused where it is written, compared here as a path


# ---------------------------------------------------------------------------- signals
def _cleanup_and_exit(signum, frame):  # pragma: no cover - runs in a signal handler, tested by subprocess
    for tmp in list(_LIVE):
        with contextlib.suppress(OSError):
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp)  # a staged folder (atomic_folder)
            else:
                os.unlink(tmp)
    _LIVE.clear()
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def install_signal_cleanup() -> bool:
    """In the main thread of a command: SIGTERM and SIGINT remove the temporary files being written
    and exit with 128 + signal (SIGINT raises KeyboardInterrupt, so the command ends with 130);
    SIGXFSZ is ignored so a file-size limit is an ordinary write error. Returns False elsewhere."""
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(signal.SIGTERM, _cleanup_and_exit)
    signal.signal(signal.SIGINT, _cleanup_and_exit)
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    return True
