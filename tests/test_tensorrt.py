"""TensorRT without TensorRT: what is refused and what is said when a library or the GPU is missing.

The engine build and the trt backend themselves run only where TensorRT and a GPU are
(tests/test_export.py::test_tensorrt_engine_parity, marked gpu).
"""

from __future__ import annotations

import sys
import types

import pytest

from cddrec.errors import BackendUnavailable, ExportError
from cddrec.export.onnx_export import ExportOptions, TensorRTOptions, export_model
from cddrec.export.tensorrt import build_engine, check_trt_graph, check_trt_request
from cddrec.runtime.backends import load_backend
from cddrec.runtime.trt_backend import TrtBackend, import_cudart

CUDA_MODULES = ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart")



def hide(monkeypatch, *names):
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError


def test_optimized_graph_refused_before_tensorrt(trained_tiny_optimized_onnx, trained_tiny_onnx, tmp_path):
    with pytest.raises(ExportError, match="--optimize.*com.microsoft:Attention.*without --optimize"):
        check_trt_graph(trained_tiny_optimized_onnx)
    check_trt_graph(trained_tiny_onnx)  # the standard-op graph passes
    from cddrec.contract import GraphContract

    spec = GraphContract(k=10, steps=4, hidden=16, max_len=8, num_items=50)
    with pytest.raises(ExportError, match="contrib ops"):  # refused before TensorRT is imported
        build_engine(trained_tiny_optimized_onnx, tmp_path / "e.plan", spec)
    with pytest.raises(ExportError, match="fp16 graph"):
        build_engine(trained_tiny_onnx, tmp_path / "e.plan", spec, fp16=True)
    assert not (tmp_path / "e.plan").exists()


def test_trt_export_requests_refused_before_writing(trained_tiny, tmp_path):
    out = tmp_path / "m.onnx"
    with pytest.raises(ExportError, match="standard-op graph.*MultiHeadAttention"):
        export_model(trained_tiny, out, ExportOptions(k=10, optimize=True), TensorRTOptions(tmp_path / "m.plan"))
    with pytest.raises(ExportError, match="--trt-fp16 needs --fp16"):
        export_model(trained_tiny, out, ExportOptions(k=10), TensorRTOptions(tmp_path / "m.plan", fp16=True))
    with pytest.raises(ExportError, match="TopK limit"):
        check_trt_request(4000, optimize=False, fp16=False, trt_fp16=False)
    assert not out.exists() and not (tmp_path / "m.plan").exists()


def test_missing_tensorrt_is_a_clear_error(trained_tiny, tmp_path, monkeypatch):
    hide(monkeypatch, "tensorrt")
    with pytest.raises(RuntimeError, match="TensorRT is not installed: pip install"):
        export_model(trained_tiny, tmp_path / "m.onnx", ExportOptions(k=10), TensorRTOptions(tmp_path / "m.plan"))
    assert not (tmp_path / "m.onnx").exists()
    hide(monkeypatch, *CUDA_MODULES)
    with pytest.raises(BackendUnavailable, match="needs tensorrt and cuda-python: pip install 'cddrec\\[gpu\\]'"):
        load_backend(tmp_path / "m.plan", "trt")


def test_missing_tensorrt_only(monkeypatch, tmp_path):
    if import_cudart() is None:
        pytest.skip("cuda-python is not installed")
    hide(monkeypatch, "tensorrt")
    with pytest.raises(BackendUnavailable, match="needs tensorrt: pip install") as e:
        TrtBackend.load(tmp_path / "m.plan")
    assert "cuda-python" not in str(e.value).split(":")[0]


def test_no_gpu_is_a_clear_error(monkeypatch, tmp_path):
    """Real cuda-python on a machine without a GPU or driver; tensorrt stands in as an empty module
    because nothing of it is reached before the device check."""
    cudart = import_cudart()
    if cudart is None:
        pytest.skip("cuda-python is not installed")
    err, count = cudart.cudaGetDeviceCount()
    if int(err) == 0 and count:
        pytest.skip("a CUDA GPU is present")
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    with pytest.raises(BackendUnavailable, match="needs a CUDA GPU: cudaGetDeviceCount failed: cudaError"):
        TrtBackend.load(tmp_path / "m.plan")


def test_engine_metadata_keeps_the_vocabulary_beside_the_engine(trained_tiny, tmp_path):
    """``vocab_file`` is a plain file name beside what it describes: an engine written in another
    folder gets a copy of the sidecar there (it used to get an absolute path)."""
    import json

    from cddrec.contract import serving_info
    from cddrec.export.tensorrt import write_engine_meta
    from cddrec.runtime.trt_backend import engine_metadata

    graph = tmp_path / "g" / "m.onnx"
    export_model(trained_tiny, graph, ExportOptions(k=5, vocab_sidecar=True))
    engine = tmp_path / "engines" / "m.plan"
    engine.parent.mkdir()
    write_engine_meta(graph, engine)
    meta = engine_metadata(engine)
    assert meta["vocab_file"] == "m.vocab.json"
    assert (engine.parent / "m.vocab.json").read_bytes() == (graph.parent / "m.vocab.json").read_bytes()
    info = serving_info(meta, engine)
    assert info.vocab.keys == json.loads((graph.parent / "m.vocab.json").read_text())["keys"]
    (engine.parent / "m.vocab.json").write_text('{"keys": ["someone else\'s"]}')
    with pytest.raises(ExportError, match="exists and is not the vocabulary"):
        write_engine_meta(graph, engine)


def test_engine_io_checked_by_the_contract_check():
    """An engine's io is checked by GraphContract.io_problems: its own tensor order, -1 for a dynamic
    axis and int32 for int64 (TensorRT narrows it) pass; a missing output, another dtype or a fixed
    dynamic axis is named."""
    import numpy as np

    from cddrec.contract import GraphContract
    from cddrec.runtime.trt_backend import engine_io_problems

    c = GraphContract(k=5, steps=4, hidden=16, max_len=8, num_items=50)
    i32, i64, f32 = np.dtype(np.int32), np.dtype(np.int64), np.dtype(np.float32)
    good = [("top_scores", False, f32, (-1, 5)), ("item_ids", True, i32, (-1, -1)),
            ("user_embedding", False, f32, (-1, 16)), ("top_items", False, i64, (-1, 5))]
    assert engine_io_problems(c, good) == []
    assert "not the contract's" in engine_io_problems(c, good[:3])[0]  # top_items missing
    wrong = [good[0], ("item_ids", True, f32, (-1, -1)), good[2], ("top_items", False, i64, (-1, 7))]
    problems = engine_io_problems(c, wrong)
    assert any("item_ids is float32" in p for p in problems) and any("top_items axis 1 is 7" in p for p in problems)
    fixed = [good[0], ("item_ids", True, i64, (4, -1)), *good[2:]]
    assert any("fixed at 4" in p for p in engine_io_problems(c, fixed))
