"""Shared fixtures: tiny configs (d=16, L=8, T=4, ~50 items) and tiny synthetic data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from cddrec.benchmarks.sizes import open_gates as draw_gates
from cddrec.config import ModelConfig, RunConfig, TrainConfig, from_flat
from cddrec.model import CDDRec
from cddrec.synthetic import make_synthetic, write_sequence_file

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("CDDREC_DATA_DIR", REPO.parent / "shared" / "data"))

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


TINY = dict(num_items=50, hidden_size=16, num_heads=2, max_len=8, steps=4, beta_T=0.04, batch_size=16, epochs=2,
            patience=2, eval_batch_size=64, seed=0, threads=1)


def tiny_configs(**overrides) -> tuple[ModelConfig, TrainConfig, RunConfig]:
    """The tiny (model, train, run) configs with flat ``overrides`` of any of their fields."""
    return from_flat({**TINY, **overrides})


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    """The tiny model config."""
    return tiny_configs()[0]


@pytest.fixture(name="tiny_configs")
def tiny_configs_fixture():
    """``tiny_configs(**overrides)``: the tiny (model, train, run) configs, for ``train(*configs, data, out)``."""
    return tiny_configs


@pytest.fixture
def open_gates():
    return draw_gates


@pytest.fixture
def tiny_model(tiny_cfg) -> CDDRec:
    """A random tiny model, rezero gates drawn."""
    torch.manual_seed(0)
    return draw_gates(CDDRec(tiny_cfg).eval())


@pytest.fixture(scope="session")
def tiny_data():
    return make_synthetic(num_users=160, num_items=50, num_clusters=5, min_len=5, max_len=14, seed=3)


@pytest.fixture(scope="session")
def tiny_data_file(tmp_path_factory, tiny_data) -> Path:
    path = tmp_path_factory.mktemp("data") / "tiny.txt"
    write_sequence_file(tiny_data, path)
    return path


def random_histories(num_items: int, batch: int, length: int, seed: int = 0, min_len: int = 1) -> torch.Tensor:
    """(batch, length) left-padded random histories of random lengths."""
    g = np.random.default_rng(seed)
    out = np.zeros((batch, length), dtype=np.int64)
    for b in range(batch):
        n = int(g.integers(min_len, length + 1))
        out[b, length - n:] = g.integers(1, num_items + 1, size=n)
    return torch.from_numpy(out)


@pytest.fixture
def data_dir() -> Path:
    if not (DATA_DIR / "Office_Products.txt").exists():
        pytest.skip(f"Amazon datasets not found in {DATA_DIR}")
    return DATA_DIR


@pytest.fixture
def make_histories():
    return random_histories


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory, tiny_data):
    """The path of a tiny model.pt trained for 3 epochs on tiny_data."""
    from cddrec.training import train

    configs = from_flat(dict(hidden_size=16, num_heads=2, max_len=8, steps=4, beta_T=0.04, batch_size=16, epochs=3,
                             patience=3, seed=0, threads=1))
    path = tmp_path_factory.mktemp("model") / "model.pt"
    train(*configs, tiny_data, path, progress=False, log=lambda m: None)
    return path


@pytest.fixture(scope="session")
def trained_tiny_onnx(trained_tiny):
    from cddrec.export.onnx_export import ExportOptions, export_model

    out = trained_tiny.with_name("model.onnx")
    export_model(trained_tiny, out, ExportOptions(k=10))
    return out


@pytest.fixture(scope="session")
def trained_tiny_optimized_onnx(trained_tiny):
    """The same model exported with --optimize: holds ONNX Runtime contrib ops (Attention, MultiHeadAttention, BiasGelu)."""
    from cddrec.export.onnx_export import ExportOptions, export_model

    out = trained_tiny.with_name("model_opt.onnx")
    export_model(trained_tiny, out, ExportOptions(k=10, optimize=True))
    return out
