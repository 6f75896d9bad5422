"""A real cddrec-serve in a subprocess, with torch blocked (serving must never need it)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

BLOCK_TORCH = "import sys\nsys.modules['torch'] = None  # import torch raises ImportError\n"


class ServerProcess:
    """``cddrec-serve ARGS --port 0`` (or the given port); ``url`` once it says it is ready."""

    def __init__(self, args: list[str], timeout: float = 120.0, block_torch: bool = True, port: int = 0):
        code = (BLOCK_TORCH if block_torch else "") + "from cddrec.app.serve import main\nmain()\n"
        self.proc = subprocess.Popen([sys.executable, "-c", code, *map(str, args), "--port", str(port)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._ready = threading.Event()
        self.url = None
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(timeout) or self.url is None:
            self.kill()
            raise AssertionError("cddrec-serve did not get ready:\n" + self.output())

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            m = re.search(r"cddrec-serve: ready at (http://[^\s/]+)", line)
            if m and self.url is None:
                self.url = m.group(1)
                self._ready.set()
        self._ready.set()

    def output(self) -> str:
        return "".join(self.lines)

    def send(self, sig=signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def stop(self, sig=signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError("cddrec-serve did not stop:\n" + self.output()) from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    # --------------------------------------------------------------------- http
    def request(self, path: str, body=None, method: str | None = None, headers: dict | None = None,
                timeout: float = 30.0) -> tuple[int, dict, bytes]:
        """(status, headers, body); ``body`` a dict/list is sent as JSON, bytes as they are."""
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
        req = urllib.request.Request(self.url + path, data=data, method=method or ("POST" if data is not None else "GET"),
                                     headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
        except urllib.error.HTTPError as e:
            return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()

    def json(self, path: str, body=None, **kw):
        status, _, raw = self.request(path, body, **kw)
        return status, json.loads(raw) if raw else None

    def metric(self, name: str) -> float:
        """Sum of the samples on /metrics that ``name`` picks (``NAME`` or ``NAME{label="value"}``)."""
        from cddrec.benchmarks.serve_load import metric_value

        _, _, raw = self.request("/metrics")
        return metric_value(raw.decode(), name)

    def wait_for(self, predicate, timeout: float = 30.0) -> None:
        end = time.time() + timeout
        while time.time() < end:
            if predicate():
                return
            time.sleep(0.1)
        raise AssertionError("condition not met in time:\n" + self.output()[-3000:])
