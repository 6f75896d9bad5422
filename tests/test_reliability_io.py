"""Outputs never replace inputs, keep the umask and symlinks, and leave no temporary files (issue 13)."""

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest
from click.testing import CliRunner

from cddrec.app.evaluate import main as eval_main
from cddrec.app.export import main as export_main
from cddrec.app.train import main as train_main
from cddrec.errors import OutputError
from cddrec.io import atomic_write_text, json_dumps, refuse_overwrite_inputs


def _no_temp(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")] == []


def test_refuse_overwrite_inputs_same_path_symlink_hardlink(tmp_path):
    data = tmp_path / "s.txt"
    data.write_text("u 1 2 3\n")
    link = tmp_path / "link.txt"
    link.symlink_to(data)
    hard = tmp_path / "hard.txt"
    os.link(data, hard)
    for out in (data, tmp_path / "." / "s.txt", link, hard):
        with pytest.raises(OutputError, match="refusing to overwrite"):
            refuse_overwrite_inputs({"--out": out}, {"DATA": data})
    with pytest.raises(OutputError, match="two outputs"):
        refuse_overwrite_inputs({"--out": tmp_path / "a", "--summary-json": tmp_path / "a"}, {})
    refuse_overwrite_inputs({"--out": tmp_path / "new.pt", "--x": None}, {"DATA": data})  # fine


def test_commands_refuse_to_overwrite_their_inputs(tmp_path, tiny_data_file, trained_tiny):
    runner = CliRunner()
    data = tmp_path / "s.txt"
    data.write_bytes(tiny_data_file.read_bytes())
    before = data.read_bytes()
    r = runner.invoke(train_main, [str(data), "--out", str(data), "--epochs", "1", "--quiet"])
    assert r.exit_code == 1 and "refusing to overwrite" in r.output and data.read_bytes() == before
    model = tmp_path / "m.pt"
    model.write_bytes(trained_tiny.read_bytes())
    mbytes = model.read_bytes()
    link = tmp_path / "link.pt"
    link.symlink_to(model)
    for out in (model, link):
        r = runner.invoke(export_main, [str(model), "-o", str(out)])
        assert r.exit_code == 1 and "refusing to overwrite" in r.output, r.output
        r = runner.invoke(eval_main, [str(model), str(data), "--save-topk", str(out)])
        assert r.exit_code == 1 and "refusing to overwrite" in r.output, r.output
    r = runner.invoke(eval_main, [str(model), str(data), "--save-topk", str(data)])
    assert r.exit_code == 1 and "refusing to overwrite" in r.output
    assert model.read_bytes() == mbytes and data.read_bytes() == before
    assert len(r.output.strip().splitlines()) == 1


def test_outputs_follow_umask_and_existing_mode(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
        os.umask(0o002)
        atomic_write_text(tmp_path / "b.txt", "x")
        assert stat.S_IMODE((tmp_path / "b.txt").stat().st_mode) == 0o664
        (tmp_path / "a.txt").chmod(0o600)  # an existing file keeps its mode, as open() would
        atomic_write_text(tmp_path / "a.txt", "y")
        assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_output_symlink_is_written_through(tmp_path):
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "out.jsonl"
    target.write_text("old\n")
    link = tmp_path / "out.jsonl"
    link.symlink_to(target)
    atomic_write_text(link, "new\n")
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text() == "new\n"
    assert _no_temp(tmp_path) and _no_temp(tmp_path / "real")


def test_json_never_holds_nan():
    text = json_dumps({"a": float("nan"), "b": [float("inf"), 1.5], "c": {"d": float("-inf")}})
    assert "NaN" not in text and "Infinity" not in text and '"b": [null, 1.5]' in text


def _script(body: str) -> str:
    return textwrap.dedent(body)


def test_sigterm_during_a_write_removes_the_temporary_file(tmp_path):
    code = _script(f"""
        import sys, time
        from cddrec.io import atomic_open, install_signal_cleanup
        assert install_signal_cleanup()
        with atomic_open({str(tmp_path / 'out.jsonl')!r}) as f:
            f.write("x" * 100000)
            f.flush()
            print("ready", flush=True)
            time.sleep(60)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    assert not _no_temp(tmp_path)  # the temporary file exists while writing
    p.send_signal(signal.SIGTERM)
    assert p.wait(30) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []


def test_failed_write_is_one_line_and_leaves_nothing(tmp_path, tiny_data_file):
    """A file-size limit (as a full disk): one line naming the file and the OS reason, rc 1."""
    out = tmp_path / "m.pt"
    code = _script(f"""
        import resource, signal, sys
        from cddrec.app.train import main as train_main
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        train_main([{str(tiny_data_file)!r}, "--out", {str(out)!r}, "--epochs", "1", "--hidden-size", "16",
                    "--num-heads", "2", "--max-len", "8", "--steps", "2", "--quiet", "--num-threads", "1"])
    """)
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert time.time() - t0 < 120
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    err = [x for x in r.stderr.splitlines() if x.startswith("Error")]
    assert len(err) == 1 and str(out) in err[0] and "File too large" in err[0], r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_train_interrupted_exit_code_and_no_files(tmp_path, tiny_data_file, sig, code):
    out = tmp_path / "m.pt"
    cmd = [sys.executable, "-c", "from cddrec.app.train import main; main()", str(tiny_data_file),
           "--out", str(out), "--epochs", "500", "--patience", "500", "--hidden-size", "16", "--num-heads", "2",
           "--max-len", "8", "--steps", "2", "--num-threads", "1", "--quiet"]
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    while "epoch" not in (line := p.stderr.readline()):
        assert line, "training ended before it was interrupted"
    p.send_signal(sig)
    assert p.wait(60) == code
    assert "Traceback" not in p.stderr.read()
    assert [f.name for f in tmp_path.iterdir() if f.name.endswith(".tmp")] == []
