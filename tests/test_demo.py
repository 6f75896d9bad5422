"""cddrec-demo never overwrites an earlier run silently and never leaves a mix of old and new files."""

import pytest
from click.testing import CliRunner

import cddrec.app.demo as demo
from cddrec.app.demo import main as demo_main


def _fake_run(fail_after: str | None = None):
    def run(work, final_dir, minutes, seed, echo):
        for name in ("synthetic.txt", "model.pt", "model.onnx"):
            (work / name).write_text(f"new {name}")
            if name == fail_after:
                raise KeyboardInterrupt
        return {"model": str(work / "model.pt"), "data": str(work / "synthetic.txt")}
    return run


def _earlier_run(folder):
    folder.mkdir()
    for name in ("synthetic.txt", "model.pt", "model.onnx", "recommendations.jsonl"):
        (folder / name).write_text(f"old {name}")


def test_refuses_an_earlier_run_without_force(tmp_path, monkeypatch):
    out = tmp_path / "cddrec-demo"
    _earlier_run(out)
    monkeypatch.setattr(demo, "_run_demo", _fake_run())
    r = CliRunner().invoke(demo_main, ["--out", str(out)])
    assert r.exit_code == 1 and "--force" in r.output and "already exists" in r.output
    assert (out / "model.pt").read_text() == "old model.pt"


def test_interrupted_rerun_leaves_the_earlier_run_whole(tmp_path, monkeypatch):
    out = tmp_path / "cddrec-demo"
    _earlier_run(out)
    monkeypatch.setattr(demo, "_run_demo", _fake_run(fail_after="synthetic.txt"))
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(out, force=True, echo=lambda m: None)
    assert sorted(p.read_text() for p in out.iterdir()) == sorted(f"old {n}" for n in (
        "synthetic.txt", "model.pt", "model.onnx", "recommendations.jsonl"))
    assert [p.name for p in tmp_path.iterdir()] == ["cddrec-demo"]  # no temporary folder left behind


def test_force_replaces_the_earlier_run_as_a_whole(tmp_path, monkeypatch):
    out = tmp_path / "cddrec-demo"
    _earlier_run(out)
    monkeypatch.setattr(demo, "_run_demo", _fake_run())
    res = demo.run_demo(out, force=True, echo=lambda m: None)
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.pt", "synthetic.txt"]
    assert all(p.read_text().startswith("new") for p in out.iterdir())
    assert res["model"] == str(out / "model.pt") and [p.name for p in tmp_path.iterdir()] == ["cddrec-demo"]
