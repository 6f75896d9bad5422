"""Every write goes through cddrec.io: special files, one lock per output, stale temporary files,
a full disk named once, missing folders refused (issue 19, items 1, 8, 14, 15, 16)."""

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time

import pytest
from click.testing import CliRunner

from cddrec.app.infer import main as infer_main
from cddrec.app.train import main as train_main
from cddrec.errors import OutputError
from cddrec.io import atomic_open, atomic_path, atomic_write_text


def _infer(graph, req, out, *extra):
    return CliRunner().invoke(infer_main, ["--model", str(graph), "--batch", str(req), "-o", str(out), "--quiet",
                                           *extra])


def device(tmp_path, name: str, minor: int):
    """A character device to write to: as root, a private node made with mknod (as the issue's
    `mknod -m 666 mynull c 1 3`), so a regression replaces that node and never the machine's
    /dev/null or /dev/full; otherwise a link to the real one (which a non-root run cannot replace)."""
    path = tmp_path / name
    if os.geteuid() == 0:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, minor))
    else:
        path.symlink_to(f"/dev/{'null' if minor == 3 else 'full'}")
    return path


@pytest.fixture
def requests_file(tmp_path):
    req = tmp_path / "req.jsonl"
    req.write_text("".join(json.dumps({"user": f"u{i}", "history": [1, 2, i % 7 + 3]}) + "\n" for i in range(20)))
    return req


# ------------------------------------------------------------------------------ special files
def test_fifo_output_is_written_through_not_replaced(tmp_path, trained_tiny_onnx, requests_file):
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    got = []
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE)
    r = _infer(trained_tiny_onnx, requests_file, fifo)
    got = reader.communicate(timeout=60)[0].decode().splitlines()
    assert r.exit_code == 0, r.output
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)  # still a FIFO
    assert [json.loads(x)["user"] for x in got] == [f"u{i}" for i in range(20)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.fifo", "req.jsonl"]  # no temporary file beside it


def test_character_device_output_is_not_replaced(tmp_path, trained_tiny_onnx, requests_file, monkeypatch):
    null = device(tmp_path, "mynull", 3)
    monkeypatch.chdir(tmp_path)
    before = os.stat(null)
    r = _infer(trained_tiny_onnx, requests_file, null)
    assert r.exit_code == 0, r.output
    after = os.stat(null)
    assert stat.S_ISCHR(after.st_mode) and after.st_ino == before.st_ino and after.st_rdev == before.st_rdev
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mynull", "req.jsonl"]


def test_stdout_output_can_be_piped(tmp_path, trained_tiny_onnx, requests_file):
    for out in ("-", "/dev/stdout"):
        p = subprocess.run([sys.executable, "-m", "cddrec.app.infer", "--model", str(trained_tiny_onnx), "--batch",
                            str(requests_file), "-o", out, "--quiet"], capture_output=True, cwd=tmp_path, timeout=120)
        assert p.returncode == 0, p.stderr
        rows = [json.loads(x) for x in p.stdout.decode().splitlines()]
        assert [x["user"] for x in rows] == [f"u{i}" for i in range(20)]
        assert b"Traceback" not in p.stderr and b"served 20 users" in p.stderr
        assert sorted(x.name for x in tmp_path.iterdir()) == ["req.jsonl"]


def test_strict_stream_output_sends_nothing_on_a_bad_line(tmp_path, trained_tiny_onnx, requests_file):
    req = tmp_path / "bad.jsonl"
    req.write_text(requests_file.read_text() * 300 + "{not json\n")  # many good blocks, then a bad line
    p = subprocess.run([sys.executable, "-m", "cddrec.app.infer", "--model", str(trained_tiny_onnx), "--batch",
                        str(req), "-o", "-", "--strict", "--allow-duplicates", "--quiet"], capture_output=True,
                       cwd=tmp_path, timeout=120)
    assert p.returncode == 1 and p.stdout == b"", p.stderr
    assert f"{req}:6001: invalid JSON".encode() in p.stderr


@pytest.mark.parametrize("kind", ["directory", "socket"])
def test_directory_or_socket_output_is_refused_in_one_line(tmp_path, trained_tiny_onnx, requests_file, kind):
    out = tmp_path / "out"
    if kind == "directory":
        out.mkdir()
    else:
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(out))
    r = _infer(trained_tiny_onnx, requests_file, out)
    assert r.exit_code == 1 and f"is a {kind}" in r.output and len(r.output.strip().splitlines()) == 1, r.output
    for fn in (lambda: atomic_write_text(out, "x"), lambda: atomic_path(out).__enter__()):
        with pytest.raises(OutputError, match=f"is a {kind}"):
            fn()


def test_atomic_path_to_a_stream_spools_and_copies(tmp_path):
    """A path-based writer (onnx.save, torch.save) given a FIFO: a spool file elsewhere, copied once complete."""
    fifo = tmp_path / "g.fifo"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE)
    with atomic_path(fifo) as tmp:
        assert tmp.parent != tmp_path
        tmp.write_bytes(b"graph bytes")
        tmp.rename(tmp.with_name(tmp.name + ".x"))  # writers that move their file around still work
        tmp.with_name(tmp.name + ".x").rename(tmp)
    assert reader.communicate(timeout=30)[0] == b"graph bytes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.fifo"]


def test_full_device_names_the_output_once(tmp_path, trained_tiny_onnx, requests_file, monkeypatch):
    full = device(tmp_path, "full", 7)
    monkeypatch.chdir(tmp_path)  # the errors file of a stream output is ./cddrec-infer.errors.jsonl
    r = _infer(trained_tiny_onnx, requests_file, full)
    assert r.exit_code == 1 and r.output.count(str(full)) == 1 and "No space left on device" in r.output
    assert len(r.output.strip().splitlines()) == 1 and stat.S_ISCHR(os.stat(full).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "req.jsonl"]  # no errors file of a failed run


def test_a_full_disk_names_the_output_not_the_errors_file(tmp_path, trained_tiny_onnx, requests_file):
    """A file-size limit stands for a full disk: the message names the file that failed, once."""
    req = tmp_path / "big.jsonl"
    req.write_text("".join(json.dumps({"user": f"u{i}", "history": [1, 2, 3]}) + "\n" for i in range(3000)))
    out = tmp_path / "out.jsonl"
    code = textwrap.dedent(f"""
        import resource, signal
        from cddrec.app.infer import main
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
        main(["--model", {str(trained_tiny_onnx)!r}, "--batch", {str(req)!r}, "-o", {str(out)!r}, "--quiet"])
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stderr
    err = [x for x in p.stderr.splitlines() if x.strip()]
    assert len(err) == 1 and err[0].count(str(out)) == 1 and "errors.jsonl" not in err[0], p.stderr
    assert "File too large" in err[0] and err[0].count("nothing was written") == 1
    assert sorted(x.name for x in tmp_path.iterdir()) == ["big.jsonl", "req.jsonl"]


# ------------------------------------------------------------------------------ folders
def test_missing_output_folder_is_refused(tmp_path, trained_tiny_onnx, requests_file, tiny_data_file):
    out = tmp_path / "no" / "such" / "out.jsonl"
    r = _infer(trained_tiny_onnx, requests_file, out)
    assert r.exit_code == 1 and "does not exist" in r.output and not (tmp_path / "no").exists()
    r = CliRunner().invoke(train_main, [str(tiny_data_file), "-o", str(out), "--epochs", "1", "--quiet"])
    assert r.exit_code == 1 and "does not exist" in r.output and not (tmp_path / "no").exists()


# ------------------------------------------------------------------------------ locks
def test_second_training_into_the_same_output_is_refused(tmp_path, tiny_data_file):
    from cddrec.io import output_lock

    out = tmp_path / "m.pt"
    with output_lock(out):
        r = CliRunner().invoke(train_main, [str(tiny_data_file), "-o", str(out), "--epochs", "1", "--quiet"])
    assert r.exit_code == 1 and "another run is writing this output" in r.output, r.output
    assert f"pid {os.getpid()}" in r.output and not out.exists()
    summary = tmp_path / "s.json"
    with output_lock(summary):
        r = CliRunner().invoke(train_main, [str(tiny_data_file), "-o", str(out), "--summary-json", str(summary),
                                            "--epochs", "1", "--quiet"])
    assert r.exit_code == 1 and "another run is writing this output" in r.output and not out.exists()


def _hold_lock_and_write(path, ready):
    """A child that takes the lock, starts writing the output and the errors file, and waits to be killed."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from cddrec.io import atomic_open, output_lock
        with output_lock({str(path)!r}), atomic_open({str(path)!r}, "wb") as f, \\
                atomic_open({str(path) + '.errors.jsonl'!r}, "wb") as g:
            f.write(b"partial"); f.flush(); g.write(b"x"); g.flush()
            open({str(ready)!r}, "w").close()
            time.sleep(120)
    """)])


def test_kill_9_leaves_nothing_that_blocks_or_lingers(tmp_path, trained_tiny_onnx, requests_file):
    out = tmp_path / "out.jsonl"
    ready = tmp_path / "ready"
    child = _hold_lock_and_write(out, ready)
    for _ in range(300):
        if ready.exists():
            break
        time.sleep(0.1)
    ready.unlink()
    r = _infer(trained_tiny_onnx, requests_file, out)
    assert r.exit_code == 1 and f"pid {child.pid}" in r.output  # held while it runs
    child.send_signal(signal.SIGKILL)
    child.wait(30)
    stale = sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp"))
    assert len(stale) == 2 and all(str(child.pid) in n for n in stale)  # what kill -9 leaves
    r = _infer(trained_tiny_onnx, requests_file, out)  # the stale lock is taken over
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "req.jsonl"]
    assert len(out.read_text().splitlines()) == 20


def test_stale_temporary_files_of_live_or_other_outputs_are_kept(tmp_path):
    out = tmp_path / "out.jsonl"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    from cddrec.io import host_tag, remove_stale_temps

    names = {f".out.jsonl.{host_tag()}.{dead.pid}.abcdefgh.tmp": False,  # a dead writer: removed
             f".out.jsonl.{host_tag()}.{os.getpid()}.abcdefgh.tmp": True,  # a live one (this process)
             f".out.jsonl.otherhost.{dead.pid}.abcdefgh.tmp": True,  # another host: cannot tell
             f".out.jsonl.errors.jsonl.{host_tag()}.{dead.pid}.abcdefgh.tmp": True,  # another output
             ".out.jsonl.abcdefgh.tmp": True}  # not our pattern
    for n in names:
        (tmp_path / n).write_text("x")
    remove_stale_temps(out)
    assert {n: (tmp_path / n).exists() for n in names} == names


def test_atomic_open_names_the_failing_file(tmp_path):
    full = device(tmp_path, "full", 7)
    with pytest.raises(OutputError, match=f"^{full}: cannot write: No space left on device$"):
        with atomic_open(full, "wb") as f:
            f.write(b"x" * 100000)
            f.flush()
    assert stat.S_ISCHR(os.stat(full).st_mode)


def test_output_and_errors_on_the_same_stream_are_refused(tmp_path, trained_tiny_onnx, requests_file, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = _infer(trained_tiny_onnx, requests_file, "-", "--errors", "/dev/stdout")
    assert r.exit_code == 1 and "given as two outputs" in r.output
    null = device(tmp_path, "null", 3)
    r = _infer(trained_tiny_onnx, requests_file, null, "--errors", null)  # discarding both is fine
    assert r.exit_code == 0, r.output
