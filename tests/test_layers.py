"""The architecture's promises: serving runs where torch cannot be imported."""

import json
import subprocess
import sys
import textwrap


def run_without_torch(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter in which ``import torch`` fails."""
    prelude = "import sys\nsys.modules['torch'] = None  # import torch raises ImportError\n"
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120)


def test_torch_is_really_blocked():
    proc = run_without_torch("import torch")
    assert proc.returncode != 0 and "import of torch halted" in proc.stderr


def test_serving_without_torch(tmp_path, trained_tiny_onnx, tiny_data):
    requests = tmp_path / "req.jsonl"
    requests.write_text("".join(json.dumps({"user": u, "history": tiny_data.items.decode(s[:-1].tolist())}) + "\n"
                                for u, s in zip(tiny_data.users[:20], tiny_data.sequences[:20])))
    out = tmp_path / "recs.jsonl"
    proc = run_without_torch(f"""
        from cddrec.runtime.recommender import Recommender
        rec = Recommender.load({str(trained_tiny_onnx)!r}, backend="ort-cpu")
        r = rec.recommend([{tiny_data.items.decode(tiny_data.sequences[0].tolist())!r}], k=5)[0]
        assert len(r.items) == 5 and r.source == "model", r
        from cddrec.app.infer import main as infer_main
        infer_main(["--model", {str(trained_tiny_onnx)!r}, "--batch", {str(requests)!r}, "--output", {str(out)!r},
                    "--quiet"], standalone_mode=False)
        assert "torch" not in sys.modules or sys.modules["torch"] is None
        print("served without torch")
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "served without torch" in proc.stdout
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["user"] for x in lines] == tiny_data.users[:20] and all(len(x["items"]) == 10 for x in lines)


def test_model_backends_say_what_is_missing_without_torch(trained_tiny):
    proc = run_without_torch(f"""
        from cddrec.errors import BackendUnavailable
        from cddrec.runtime.backends import load_backend
        try:
            load_backend({str(trained_tiny)!r}, "torch")
        except BackendUnavailable as e:
            print("unavailable:", e)
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "unavailable:" in proc.stdout and "torch" in proc.stdout


def test_training_commands_say_what_to_install_without_torch(trained_tiny):
    proc = run_without_torch(f"""
        from cddrec.app.export import main as export_main
        export_main([{str(trained_tiny)!r}, "-o", "/tmp/never-written.onnx"])
    """)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "pip install 'cddrec[train]'" in proc.stderr
