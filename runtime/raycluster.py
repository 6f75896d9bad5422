"""Joining Ray for ``cddrec-infer --ray`` and ``cddrec-serve --ray``: one place for the address, the
checks and the quiet terminal (torch-free; Ray is imported only here and by its callers).

``connect(address)`` starts Ray in this process (``local``), joins the cluster Ray finds
(``auto``) or the one at ``HOST:PORT`` (checked to accept connections first, so a wrong address
is one line instead of minutes of retries). ``quiet(verbose)`` sends Ray's own logging (Python
loggers, and its core worker's C++ log on the process's stdout and stderr) to a log file instead
of the terminal, unless ``verbose``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import tempfile
from typing import Iterator

from cddrec.errors import BackendUnavailable, CDDRecError, ConfigError
from cddrec.vocab import ascii_digits

CONNECT_SECONDS = 5.0


def import_ray():
    try:
        import ray
    except ImportError as e:
        raise BackendUnavailable("--ray needs Ray: pip install 'cddrec[ray]'") from e
    return ray


def check_address(address: str) -> None:
    """A ``HOST:PORT`` that does not accept a TCP connection within ``CONNECT_SECONDS``: one line."""
    if address in ("local", "auto") or "://" in address:
        return
    host, sep, port = address.rpartition(":")
    if not sep or not ascii_digits(port):
        raise ConfigError(f"--ray {address!r}: expected 'local', 'auto' or HOST:PORT of a Ray head (ray start --head)")
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_SECONDS):
            pass
    except OSError as e:
        raise ConfigError(f"--ray {address}: no Ray head answers there ({e.strerror or e}); start one with "
                          "'ray start --head' or use --ray local") from None


def connect(address: str, num_cpus: int | None = None) -> bool:
    """Initialise Ray for ``address`` unless it already is; returns whether this call started it."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    check_address(address)
    quiet_loggers = {"log_to_driver": False, "configure_logging": False, "logging_level": logging.ERROR}
    if address == "local":
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, **quiet_loggers)
    else:
        ray.init(address=address, **quiet_loggers)
    return True


@contextlib.contextmanager
def quiet(verbose: bool = False) -> Iterator[None]:
    """Ray's terminal output goes to a log file unless ``verbose``; the file is kept, and named, only when
    the block fails with something other than a one-line ``CDDRecError``."""
    if verbose:
        yield
        return
    fd, log = tempfile.mkstemp(prefix="cddrec-ray-", suffix=".log")
    for f in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            f.flush()
    saved = [os.dup(1), os.dup(2)]
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    ok = False
    try:
        with open(fd, "w", closefd=False) as text, contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
            yield
        ok = True
    except CDDRecError:  # an expected error: its one line says it all
        ok = True
        raise
    finally:
        for f in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                f.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for x in (*saved, fd):
            os.close(x)
        if ok:
            os.unlink(log)
        else:
            print(f"(Ray's log of this run: {log})", file=sys.stderr)
