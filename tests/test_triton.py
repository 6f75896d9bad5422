"""Triton model repository: config.pbtxt against the graph itself, the copied graph, the client codec."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from google.protobuf import text_format

from cddrec.errors import ExportError, OutputError
from cddrec.export.onnx_export import ExportOptions, export_model
from cddrec.export.triton import model_config_pb2, write_triton_repo
from cddrec.io import current_umask
from cddrec.runtime.triton_client import ClientFileError, TritonClientCodec

tritonclient_utils = pytest.importorskip("tritonclient.utils")


def parse_config(path):
    pb = model_config_pb2()
    return text_format.Parse(path.read_text(), pb.ModelConfig()), pb


def graph_io(path):
    m = onnx.load(str(path))
    return [(v.name, v.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
            for v in m.graph.input], \
           [(v.name, v.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
            for v in m.graph.output]


def triton_type(elem: int) -> str:
    """Independent of the writer: ONNX type -> numpy -> tritonclient's own name."""
    return "TYPE_" + tritonclient_utils.np_to_triton_dtype(onnx.helper.tensor_dtype_to_np_dtype(elem))


def check_tensors(config_tensors, graph_tensors, pb, batched: bool):
    assert [t.name for t in config_tensors] == [name for name, _, _ in graph_tensors]
    for t, (name, elem, dims) in zip(config_tensors, graph_tensors):
        assert pb.DataType.Name(t.data_type) == triton_type(elem), name
        want = dims[1:] if batched else dims
        assert list(t.dims) == [-1 if isinstance(d, str) else d for d in want], name


def run(path, ids):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"item_ids": ids})



def test_gpu_repo_config_matches_graph(trained_tiny_onnx, tmp_path, make_histories):
    repo = write_triton_repo(trained_tiny_onnx, tmp_path / "models", "recs", max_batch=512)
    assert repo.config == tmp_path / "models" / "recs" / "config.pbtxt"
    assert repo.graph == tmp_path / "models" / "recs" / "1" / "model.onnx"
    cfg, pb = parse_config(repo.config)
    assert (cfg.name, cfg.platform, cfg.backend, cfg.max_batch_size) == ("recs", "onnxruntime_onnx", "onnxruntime", 512)
    inputs, outputs = graph_io(repo.graph)
    check_tensors(cfg.input, inputs, pb, batched=True)
    check_tensors(cfg.output, outputs, pb, batched=True)
    assert list(cfg.input[0].dims) == [-1]  # history is dynamic, batch left out
    assert list(cfg.output[0].dims) == [10]  # K
    assert list(cfg.dynamic_batching.preferred_batch_size) == [256, 512]
    assert cfg.dynamic_batching.max_queue_delay_microseconds > 0
    assert [(g.kind, g.count) for g in cfg.instance_group] == [(pb.ModelInstanceGroup.KIND_GPU, 1)]
    accs = cfg.optimization.execution_accelerators.gpu_execution_accelerator
    assert [a.name for a in accs] == ["tensorrt"]
    params = dict(accs[0].parameters)
    assert params["precision_mode"] == "FP32"
    assert "trt_cuda_graph_enable" not in params  # opt-in
    L = json.loads(repo.sidecar.read_text())["L"]
    assert (params["trt_profile_min_shapes"], params["trt_profile_opt_shapes"], params["trt_profile_max_shapes"]) == \
        ("item_ids:1x1", f"item_ids:256x{L}", "item_ids:512x512")
    assert not cfg.optimization.HasField("cuda")  # only Triton's TensorRT backend reads optimization.cuda

    for f in (repo.config, repo.graph, repo.sidecar):  # readable by the server's user, as open() would make them
        assert f.stat().st_mode & 0o777 == 0o666 & ~current_umask()
    ids = make_histories(50, 9, 12, seed=5).numpy()
    for a, b in zip(run(repo.graph, ids), run(trained_tiny_onnx, ids)):
        np.testing.assert_array_equal(a, b)


def test_cpu_repo_without_batching_and_options(trained_tiny_onnx, tmp_path):
    repo = write_triton_repo(trained_tiny_onnx, tmp_path, gpu=False, max_batch=0)
    cfg, pb = parse_config(repo.config)
    assert cfg.name == "cddrec" and cfg.max_batch_size == 0
    inputs, outputs = graph_io(repo.graph)
    check_tensors(cfg.input, inputs, pb, batched=False)
    check_tensors(cfg.output, outputs, pb, batched=False)
    assert list(cfg.input[0].dims) == [-1, -1]
    assert not cfg.HasField("dynamic_batching")
    assert cfg.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU
    assert not cfg.HasField("optimization")

    repo = write_triton_repo(trained_tiny_onnx, tmp_path, "g", precision="FP16", cuda_graphs=True,
                             preferred_batch=(8, 64), max_batch=64)
    cfg, _ = parse_config(repo.config)
    params = dict(cfg.optimization.execution_accelerators.gpu_execution_accelerator[0].parameters)
    assert params["precision_mode"] == "FP16" and params["trt_cuda_graph_enable"] == "1"
    assert list(cfg.dynamic_batching.preferred_batch_size) == [8, 64]
    with pytest.raises(ExportError, match="CUDA graphs"):
        write_triton_repo(trained_tiny_onnx, tmp_path, "h", gpu=False, cuda_graphs=True)
    with pytest.raises(ExportError, match="preferred batch sizes"):
        write_triton_repo(trained_tiny_onnx, tmp_path, "h", max_batch=8, preferred_batch=(16,))
    assert not (tmp_path / "h").exists()


def test_contrib_op_graph_refused_for_tensorrt(trained_tiny_optimized_onnx, tmp_path):
    with pytest.raises(ExportError, match="contrib ops.*MultiHeadAttention"):
        write_triton_repo(trained_tiny_optimized_onnx, tmp_path, "opt")
    assert not (tmp_path / "opt").exists()
    repo = write_triton_repo(trained_tiny_optimized_onnx, tmp_path, "opt", tensorrt=False)  # CUDA provider only: allowed
    cfg, _ = parse_config(repo.config)
    assert not cfg.optimization.execution_accelerators.gpu_execution_accelerator


def test_stochastic_graph_needs_no_batching(trained_tiny, tmp_path):
    graph = tmp_path / "sto.onnx"
    export_model(trained_tiny, graph, ExportOptions(k=5, stochastic=True))
    with pytest.raises(ExportError, match="--triton-max-batch 0"):
        write_triton_repo(graph, tmp_path / "repo", max_batch=64)
    repo = write_triton_repo(graph, tmp_path / "repo", max_batch=0)
    cfg, _ = parse_config(repo.config)
    assert [t.name for t in cfg.input] == ["item_ids", "noise"]
    assert list(cfg.input[1].dims)[0] > 0 and list(cfg.input[1].dims)[1] == -1  # (T, batch, d)
    params = dict(cfg.optimization.execution_accelerators.gpu_execution_accelerator[0].parameters)
    assert params["trt_profile_max_shapes"].startswith("item_ids:1024x512,noise:")


def test_client_codec_matches_recommender(trained_tiny_onnx, tmp_path):
    from cddrec.runtime.recommender import Recommender

    repo = write_triton_repo(trained_tiny_onnx, tmp_path)
    codec = TritonClientCodec.load(repo.sidecar)
    rec = Recommender.load(trained_tiny_onnx)
    assert codec.keys == rec.info.vocab.keys and codec.K == rec.info.K
    rng = np.random.default_rng(11)
    keys = rec.info.vocab.keys
    histories = [list(rng.choice(keys, size=int(rng.integers(1, 30)))) for _ in range(12)]
    histories[3] = ["never-seen", "nope"]  # cold start: not sent
    histories[5] = histories[5] + ["unknown-item"]
    histories[7] = []
    batch = codec.encode(histories, width=16)
    assert batch.rows == [r for r in range(12) if r not in (3, 7)]
    assert batch.item_ids.shape[1] >= 16 and batch.item_ids.dtype == np.int64
    items, scores, _ = run(repo.graph, batch.item_ids)  # what Triton returns for "top_items", "top_scores"
    got = codec.decode(batch, items, scores, k=7)
    want = rec.recommend(histories, k=7)
    for g, w in zip(got, want):
        assert g["items"] == w.items and g["source"] == w.source and g["unknown"] == w.unknown
        np.testing.assert_allclose(g["scores"], w.scores, rtol=1e-6, atol=1e-6)
    assert got[3]["source"] == "popularity" and got[3]["unknown"] == 2 and got[5]["unknown"] == 1
    with pytest.raises(ValueError, match="at most K"):
        codec.decode(batch, items, scores, k=codec.K + 1)


def test_client_codec_bad_files(tmp_path):
    with pytest.raises(ClientFileError, match="no such file"):
        TritonClientCodec.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ClientFileError, match="bad.json: not readable JSON"):
        TritonClientCodec.load(bad)
    bad.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ClientFileError, match="not a cddrec Triton client file"):
        TritonClientCodec.load(bad)
    bad.write_text(json.dumps({"format": "cddrec-triton-client", "vocab": {"keys": ["a"]}}))
    with pytest.raises(ClientFileError, match="missing or malformed field"):
        TritonClientCodec.load(bad)


def test_cli_writes_repo_and_refuses_optimize(trained_tiny, tmp_path):
    from cddrec.app.export import main as export_main

    runner = CliRunner()
    res = runner.invoke(export_main, [str(trained_tiny), "-o", str(tmp_path / "m.onnx"), "--k", "5",
                                      "--triton-repo", str(tmp_path / "repo"), "--triton-name", "rec",
                                      "--triton-cpu", "--triton-max-batch", "32"])
    assert res.exit_code == 0, res.output
    cfg, pb = parse_config(tmp_path / "repo" / "rec" / "config.pbtxt")
    assert cfg.max_batch_size == 32 and cfg.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU
    assert list(cfg.output[0].dims) == [5]
    assert (tmp_path / "repo" / "rec" / "vocab.json").exists()
    res = runner.invoke(export_main, [str(trained_tiny), "-o", str(tmp_path / "o.onnx"), "--optimize",
                                      "--triton-repo", str(tmp_path / "repo2")])
    assert res.exit_code != 0 and "standard-op graph" in res.output
    assert not (tmp_path / "o.onnx").exists()


def test_client_codec_refuses_duplicate_keys(trained_tiny_onnx, tmp_path):
    repo = write_triton_repo(trained_tiny_onnx, tmp_path)
    doc = json.loads(repo.sidecar.read_text())
    doc["vocab"]["keys"][2] = doc["vocab"]["keys"][0]
    repo.sidecar.write_text(json.dumps(doc))
    with pytest.raises(ClientFileError, match="repeats the item key"):
        TritonClientCodec.load(repo.sidecar)


def test_one_client_format_and_one_metadata_reader(trained_tiny_onnx, tmp_path, monkeypatch):
    """Issue 18: the writer wrote its own copy of the client format string and re-read the graph's
    metadata with less validation than serving; both now come from one place."""
    import cddrec.export.triton as triton
    from cddrec.runtime import triton_client

    repo = write_triton_repo(trained_tiny_onnx, tmp_path / "a")
    assert json.loads(repo.sidecar.read_text())["format"] == triton_client.FORMAT
    calls = []
    real = triton.serving_info
    monkeypatch.setattr(triton, "serving_info", lambda meta, source: calls.append(source) or real(meta, source))
    write_triton_repo(trained_tiny_onnx, tmp_path / "b")
    assert calls == [trained_tiny_onnx]


def test_stale_version_is_refused_then_replaced_whole_with_force(trained_tiny, trained_tiny_onnx, tmp_path):
    """Issue 19 item 3: a re-export into a model folder left version 2 (another graph) beside the new
    version 1 and vocab.json; Triton's default policy would serve version 2 with the new vocabulary."""
    from cddrec.app.export import main as export_main

    stale = tmp_path / "trepo" / "cddrec" / "2"
    stale.mkdir(parents=True)
    (stale / "model.onnx").write_bytes(b"another graph")
    graph = tmp_path / "m.onnx"
    args = [str(trained_tiny), "-o", str(graph), "--k", "5", "--triton-repo", str(tmp_path / "trepo"), "--triton-cpu"]
    r = CliRunner().invoke(export_main, args)
    assert r.exit_code == 1 and "model folder exists" in r.output and "--force" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1
    assert not graph.exists()  # refused before anything was written
    assert (stale / "model.onnx").read_bytes() == b"another graph"

    r = CliRunner().invoke(export_main, args + ["--force"])
    assert r.exit_code == 0, r.output
    model_dir = tmp_path / "trepo" / "cddrec"
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "config.pbtxt", "vocab.json"]  # version 2 is gone
    assert (model_dir / "1" / "model.onnx").read_bytes() == graph.read_bytes()
    cfg, _ = parse_config(model_dir / "config.pbtxt")
    assert list(cfg.version_policy.specific.versions) == [1]
    assert not [p for p in (tmp_path / "trepo").iterdir() if p.name.startswith(".")]  # no staging folder left
    r = CliRunner().invoke(export_main, [str(trained_tiny), "-o", str(tmp_path / "x.onnx"), "--force"])
    assert r.exit_code == 2 and "--force replaces a Triton model folder" in r.output


def test_failed_repository_write_keeps_the_old_folder(trained_tiny_onnx, tmp_path, monkeypatch):
    import cddrec.export.triton as triton

    repo = write_triton_repo(trained_tiny_onnx, tmp_path)
    before = {p.relative_to(tmp_path): p.read_bytes() for p in repo.model_dir.rglob("*") if p.is_file()}

    def broken(src, dst, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(triton.shutil, "copyfile", broken)
    with pytest.raises(OutputError, match="No space left on device"):
        write_triton_repo(trained_tiny_onnx, tmp_path, force=True)
    after = {p.relative_to(tmp_path): p.read_bytes() for p in repo.model_dir.rglob("*") if p.is_file()}
    assert after == before and sorted(p.name for p in tmp_path.iterdir()) == ["cddrec"]
