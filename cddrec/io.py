"""Atomic file output: write to a temporary file beside the target, then rename.

A crash, a failed validation, a full disk or a signal never leaves a truncated file that looks
complete, never leaves a hidden temporary file behind, and never replaces what was already
there. Outputs get the permissions a plain ``open()`` would give them (the user's umask, or
the existing file's mode); an output path that is a symbolic link is written through: the
link's target is replaced atomically and the link stays. ``refuse_overwrite_inputs`` is the
one check that no output of a command is one of its inputs (same path, symlink or hard link).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import tempfile
import threading
from pathlib import Path
from typing import IO, Iterator

from .errors import OutputError

# temporary files being written right now; removed by the signal handler (see install_signal_cleanup)
_LIVE: set[Path] = set()


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _target(path: Path) -> Path:
    """The file to replace: the final target of a symbolic link, else ``path`` itself."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto ``path`` on success.

    An OS error while writing (disk full, file-size limit, permissions) becomes an ``OutputError``
    naming ``path`` and the reason; the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    target = _target(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        mode = stat.S_IMODE(target.stat().st_mode) if target.exists() else 0o666 & ~current_umask()
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
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
        except OSError as e:
            raise OutputError(f"{path}: cannot write: {e.strerror or e}; nothing was written") from None
    finally:
        _LIVE.discard(tmp)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs) -> Iterator[IO]:
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kwargs) as f:
            yield f


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json_dumps(obj, indent=2) + "\n")


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
    hard link of it) or two outputs are the same file. Keys name the options in the message."""
    outs = [(n, Path(p)) for n, p in outputs.items() if p]
    ins = [(n, Path(p)) for n, p in inputs.items() if p]
    for i, (oname, o) in enumerate(outs):
        for iname, p in ins:
            if _same_file(o, p):
                raise OutputError(f"{o}: the output ({oname}) is the input {iname} ({p}); refusing to overwrite "
                                  "it, choose another output path")
        for oname2, o2 in outs[i + 1:]:
            if _same_file(o, o2):
                raise OutputError(f"{o}: given as two outputs ({oname} and {oname2}); choose different paths")


# ---------------------------------------------------------------------------- signals
def _cleanup_and_exit(signum, frame):  # pragma: no cover - runs in a signal handler, tested by subprocess
    for tmp in list(_LIVE):
        with contextlib.suppress(OSError):
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
