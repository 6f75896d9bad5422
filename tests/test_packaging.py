"""The layout holds as installed: the layer contracts catch a planted violation, and a wheel installed
into a fresh folder imports the same modules, finds the torch backends by entry point and serves."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _lint(source: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "tools" / "lint-layers"), str(source)], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def checkout_copy(tmp_path_factory) -> Path:
    """The tracked sources of this checkout, copied (no build outputs, no caches)."""
    dst = tmp_path_factory.mktemp("checkout") / "cddrec-src"
    shutil.copytree(REPO, dst, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", ".ruff_cache",
                                                             ".pytest_cache", "cddrec-demo", "cddrec-bench", "site"))
    return dst


def test_layer_contracts_hold_and_catch_a_new_core_module_importing_a_wing(checkout_copy):
    if shutil.which("lint-imports") is None:
        pytest.skip("import-linter is not installed")
    kept = _lint(checkout_copy)
    assert kept.returncode == 0, kept.stdout[-2000:] + kept.stderr[-2000:]
    planted = checkout_copy / "cddrec" / "planted_module.py"  # a core module nobody listed anywhere
    planted.write_text("from cddrec.runtime.session import ort_session  # a core module reaching up into a wing\n")
    try:
        broken = _lint(checkout_copy)
    finally:
        planted.unlink()
    assert broken.returncode != 0
    assert "BROKEN" in broken.stdout and "cddrec.planted_module" in broken.stdout


def test_wheel_installs_and_serves_from_a_fresh_folder(tmp_path, checkout_copy, trained_tiny_onnx, tiny_data):
    dist, site = tmp_path / "dist", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(dist),
                    str(checkout_copy)], check=True, capture_output=True, timeout=300)
    wheels = list(dist.glob("cddrec-*.whl"))
    assert len(wheels) == 1
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(wheels[0])],
                   check=True, capture_output=True, timeout=300)
    assert not any(p.is_symlink() for p in site.rglob("*"))
    assert {p.name for p in (site / "cddrec").iterdir() if p.is_dir() and p.name != "__pycache__"} >= \
        {"app", "export", "runtime", "benchmarks"}
    requests = tmp_path / "req.jsonl"
    requests.write_text("".join(json.dumps({"user": u, "history": tiny_data.items.decode(s[:-1].tolist())}) + "\n"
                                for u, s in zip(tiny_data.users[:30], tiny_data.sequences[:30])))
    out = tmp_path / "recs.jsonl"
    env = {**os.environ, "PYTHONPATH": str(site)}
    probe = subprocess.run([sys.executable, "-c", "import importlib.metadata as m, cddrec; d = m.distribution('cddrec'); "
                            "print(cddrec.__file__); print(d.locate_file('')); "
                            "print(sorted(e.name for e in d.entry_points if e.group == 'cddrec.backends'))"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    path, dist_root, names = probe.stdout.splitlines()
    assert path.startswith(str(site)) and dist_root.startswith(str(site))  # the wheel's, not this checkout's
    assert "torch-cuda" in names and "torch" in names  # the torch backends, registered by entry point
    proc = subprocess.run([sys.executable, "-m", "cddrec.app.infer", "--model", str(trained_tiny_onnx), "--batch",
                           str(requests), "-o", str(out), "--quiet"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["user"] for x in lines] == tiny_data.users[:30] and all(len(x["items"]) == 10 for x in lines)
