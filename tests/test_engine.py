"""The CPU engine: the fused graph (contrib ops) and the int8 graph, each against the plain reference."""

import numpy as np
import onnx
import pytest
import torch

from cddrec.checkpoint import load_checkpoint, save_checkpoint
from cddrec.contract import APPROX_MIN_OVERLAP
from cddrec.errors import ExportError
from cddrec.export.fusion import FUSIONS, FusedRecommender
from cddrec.export.graph import UnrolledRecommender
from cddrec.export.onnx_export import ExportOptions, export_model
from cddrec.inference import reference_runner, reference_topk
from cddrec.model import CDDRec
from cddrec.parity import compare_runners, topk_overlap
from cddrec.runtime.backends import load_backend
from cddrec.runtime.session import ort_session
from cddrec.vocab import Vocab


def _ckpt(tmp_path, cfg, name="m.pt"):
    torch.manual_seed(7)
    model = CDDRec(cfg).eval()
    with torch.no_grad():
        model.item_emb.weight.normal_(0, 0.5)  # scores with some spread
        if model.decoder is not None and model.decoder.gate is not None:
            model.decoder.gate.normal_()  # as after training: the decoder contributes
    save_checkpoint(tmp_path / name, model, Vocab.build(str(100 + i) for i in range(cfg.num_items)),
                    torch.arange(cfg.num_rows))
    return tmp_path / name


def _run(sess, ids, noise=None):
    feed = {"item_ids": ids.numpy()}
    if noise is not None:
        feed["noise"] = noise.numpy()
    return sess.run(["top_items", "top_scores", "user_embedding"], feed)


@pytest.mark.parametrize("norm", ["rezero", "pre", "post"])
@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("fusions", [FUSIONS, ()])
def test_fused_module_equals_unrolled_in_torch(tiny_cfg, make_histories, open_gates, norm, stochastic, fusions):
    torch.manual_seed(3)
    model = open_gates(CDDRec(tiny_cfg.replace(decoder_norm=norm, num_layers=2)).eval())
    ids = make_histories(50, 9, 11, seed=5)
    noise = torch.randn(model.steps, 9, 16) if stochastic else None
    args = (ids, noise) if stochastic else (ids,)
    with torch.no_grad():
        ref = UnrolledRecommender(model, 7, stochastic=stochastic)(*args)
        out = FusedRecommender(model, 7, stochastic=stochastic, fusions=fusions)(*args)
    assert torch.allclose(out[2], ref[2], atol=1e-5)
    assert torch.allclose(out[1], ref[1], atol=1e-5) and torch.equal(out[0], ref[0])


@pytest.mark.parametrize("norm", ["rezero", "post"])
def test_fused_graph_parity_on_fresh_random_histories(tmp_path, tiny_cfg, make_histories, norm):
    ckpt = _ckpt(tmp_path, tiny_cfg.replace(decoder_norm=norm))
    rep = export_model(ckpt, tmp_path / "f.onnx", ExportOptions(k=10, optimize=True))
    ops = {n.op_type for n in onnx.load(str(tmp_path / "f.onnx")).graph.node}
    assert {"Attention", "MultiHeadAttention", "BiasGelu"} <= ops  # contrib ops in the one graph
    assert sum(rep.ops_optimized.values()) < sum(rep.ops.values())
    model, _ = load_checkpoint(ckpt)
    be = load_backend(tmp_path / "f.onnx", "ort-cpu")
    feeds = {f"{b}x{s}": {"item_ids": make_histories(50, b, s, seed=200 + b).numpy()}  # fresh, not the export's
             for b, s in ((1, 3), (5, 8), (40, 20))}
    parity = compare_runners({"fused": be.infer}, reference_runner(model), feeds, **be.contract.parity_rule("cpu"))
    assert parity.ok, parity.failures()
    user = be.infer(feeds["40x20"])["user_embedding"]
    assert np.abs(user - reference_topk(model, torch.from_numpy(feeds["40x20"]["item_ids"]), 10)[2].numpy()).max() \
        <= be.contract.tolerance[1]


def test_fused_stochastic_graph_matches_given_the_noise(tmp_path, tiny_cfg, make_histories):
    ckpt = _ckpt(tmp_path, tiny_cfg)
    export_model(ckpt, tmp_path / "s.onnx", ExportOptions(k=10, optimize=True, stochastic=True))
    model, _ = load_checkpoint(ckpt)
    ids = make_histories(50, 6, 8, seed=9)
    noise = torch.randn(model.steps, 6, 16, generator=torch.Generator().manual_seed(4))
    items, scores, _ = _run(ort_session(tmp_path / "s.onnx"), ids, noise)
    ref_items, ref_scores, _ = reference_topk(model, ids, 10, noise)
    assert np.abs(scores - ref_scores.numpy()).max() <= 1e-4 and (items == ref_items.numpy()).all()


def _approximate_parity(ckpt, graph, ids):
    """An approximate graph on fresh histories against the plain reference under its contract's rule
    (the declared top-k overlap). Returns the graph's top items."""
    model, _ = load_checkpoint(ckpt)
    be = load_backend(graph, "ort-cpu")
    assert be.contract.min_overlap == APPROX_MIN_OVERLAP
    feed = {"item_ids": ids.numpy()}
    parity = compare_runners({"approximate": be.infer}, reference_runner(model), {str(len(ids)): feed},
                             **be.contract.parity_rule("cpu"))
    assert parity.ok, parity.failures()
    return be.infer(feed)["top_items"]


def test_int8_graph_parity_is_reported_and_holds_on_fresh_histories(tmp_path, tiny_cfg, make_histories):
    ckpt = _ckpt(tmp_path, tiny_cfg.replace(hidden_size=32, num_items=300))
    rep = export_model(ckpt, tmp_path / "q.onnx", ExportOptions(k=10, int8=True))
    proto = onnx.load(str(tmp_path / "q.onnx"))
    ops = [n.op_type for n in proto.graph.node]
    assert rep.int8["matmuls_int8"] > 0 and ops.count("MatMulInteger") == rep.int8["matmuls_int8"]
    assert len(rep.int8["excluded"]) == 1  # the scoring MatMul stays fp32
    assert set(rep.topk_overlap) == set(rep.max_abs_diff) == {"1", "7", "64"}
    assert min(rep.topk_overlap.values()) >= APPROX_MIN_OVERLAP
    assert 0 < max(rep.max_abs_diff.values()) < 0.5  # not exact, and not far
    ids = make_histories(300, 50, 12, seed=77)
    items = _approximate_parity(ckpt, tmp_path / "q.onnx", ids)
    for b in range(50):  # masking is unchanged by quantization
        assert not set(items[b].tolist()) & (set(ids[b].tolist()) | {0, 301})


def test_int8_validation_rejects_a_wrong_graph(tmp_path, tiny_cfg):
    from cddrec.export.onnx_export import contract_for, validate_graph

    ckpt = _ckpt(tmp_path, tiny_cfg)
    export_model(ckpt, tmp_path / "q.onnx", ExportOptions(k=10, int8=True))
    torch.manual_seed(99)
    other = CDDRec(tiny_cfg).eval()
    with torch.no_grad():
        other.item_emb.weight.normal_(0, 0.5)
    with pytest.raises(ExportError, match="overlap"):
        validate_graph(tmp_path / "q.onnx", other, contract_for(other, 10, min_overlap=APPROX_MIN_OVERLAP))


def test_engine_options_conflict(tmp_path, tiny_cfg):
    ckpt = _ckpt(tmp_path, tiny_cfg)
    with pytest.raises(ExportError, match="fp32 ONNX Runtime graphs: not with --fp16"):
        export_model(ckpt, tmp_path / "x.onnx", ExportOptions(optimize=True, fp16=True))
    with pytest.raises(ValueError, match="unknown fusions"):
        FusedRecommender(load_checkpoint(ckpt)[0], 5, fusions=("nope",))
    assert not (tmp_path / "x.onnx").exists()


def test_bench_backend_names():
    from cddrec.benchmarks.latency import split_backend

    assert split_backend("ort-cpu-int8") == ("ort-cpu-int8", 0)
    assert split_backend("ort-cpu-fused:t1") == ("ort-cpu-fused", 1)
    with pytest.raises(ValueError, match="tN"):
        split_backend("ort-cpu:x2")


def test_catalogue_topk_variants_against_numpy():
    import onnxruntime as ort

    from cddrec.benchmarks.catalogue_topk import build, run_variant, table_feeds

    rng = np.random.default_rng(0)
    V, d, B = 500, 16, 9
    table = rng.standard_normal((V, d)).astype(np.float32)
    user = rng.standard_normal((B, d)).astype(np.float32)
    excluded = rng.integers(0, V, size=(B, 6))
    ref = user @ table.T  # (B, V)
    np.put_along_axis(ref, excluded, -np.inf, axis=1)
    ref_top = np.argsort(-ref, axis=1)[:, :10]
    feeds = table_feeds(table)

    def top(variant, c=0):
        sess = ort.InferenceSession(build(variant, d, 10, c).SerializeToString(), providers=["CPUExecutionProvider"])
        return run_variant(sess, feeds, user, excluded)

    items, scores = top("exact")
    assert (items == ref_top).all() and np.allclose(scores, np.take_along_axis(ref, ref_top, 1), atol=1e-4)
    items, scores = top("int8", V - 10)  # rescoring every candidate is exact
    assert (items == ref_top).all() and np.allclose(scores, np.take_along_axis(ref, ref_top, 1), atol=1e-4)
    items, _ = top("int8")  # approximate: mostly the same items, never an excluded one
    assert topk_overlap(items, ref_top) >= 0.8
    assert not any(set(a) & set(e) for a, e in zip(items.tolist(), excluded.tolist()))


def test_graph_quality_ranks_targets(tmp_path, trained_tiny, tiny_data):
    from cddrec.benchmarks.graph_quality import full_histories, graph_ranks
    from cddrec.data import eval_split
    from cddrec.evaluation import evaluate

    export_model(trained_tiny, tmp_path / "g.onnx", ExportOptions(k=40))
    model, _ = load_checkpoint(trained_tiny)
    split = eval_split(tiny_data, "test", model.cfg.max_len)
    hist = full_histories(split, np.arange(3))
    assert hist.shape[0] == 3 and (hist[:, -1] > 0).all()
    ranks = graph_ranks(tmp_path / "g.onnx", split)
    ref = evaluate(model, split).metrics
    hit10 = float(np.mean(ranks < 10))
    assert abs(hit10 - ref["R@10"]) <= 2 / len(split)  # the graph ranks as the evaluation does (ties aside)


def test_two_stage_topk_graph_returns_exact_scores(tmp_path, tiny_cfg, make_histories):
    ckpt = _ckpt(tmp_path, tiny_cfg.replace(num_items=400, hidden_size=32))
    rep = export_model(ckpt, tmp_path / "r.onnx", ExportOptions(k=10, rescore=30))
    ops = [n.op_type for n in onnx.load(str(tmp_path / "r.onnx")).graph.node]
    assert "DynamicQuantizeMatMul" in ops and ops.count("TopK") == 2  # the exact full-table TopK is gone
    assert min(rep.topk_overlap.values()) >= APPROX_MIN_OVERLAP
    model, _ = load_checkpoint(ckpt)
    ids = make_histories(400, 40, 12, seed=31)
    items, scores, user = _run(ort_session(tmp_path / "r.onnx"), ids)
    from cddrec.inference import reference_scores

    full, ref_user = reference_scores(model, ids)  # (B, V) masked
    ref_items = full.topk(10, dim=1).indices.numpy()
    assert np.abs(user - ref_user.numpy()).max() <= 1e-4
    # every returned score is the item's exact score; the items are (nearly) the exact top-10
    assert np.abs(scores - np.take_along_axis(full.numpy(), items, 1)).max() <= 1e-4
    assert topk_overlap(items, ref_items) >= 0.95
    assert (np.diff(scores, axis=1) <= 0).all()
    for b in range(40):
        assert not set(items[b].tolist()) & (set(ids[b].tolist()) | {0, 401})
    with pytest.raises(ExportError, match="at least --k"):
        export_model(ckpt, tmp_path / "x.onnx", ExportOptions(k=10, rescore=5))


def test_int8_scores_emulation_matches_ort(tmp_path):
    from cddrec.export.catalogue import Int8Scores, quantize_rows

    g = torch.Generator().manual_seed(0)
    table, user = torch.randn(300, 24, generator=g), torch.randn(5, 24, generator=g)
    q, scale = quantize_rows(table)
    approx = Int8Scores.apply(user, q, scale)
    exact = user @ table.t()
    assert (approx - exact).abs().max() <= 0.02 * exact.abs().max()  # int8 is close to fp32

    class M(torch.nn.Module):
        def forward(self, u):
            return Int8Scores.apply(u, q, scale)

    torch.onnx.export(M(), (user,), str(tmp_path / "s.onnx"), input_names=["u"], output_names=["s"],
                      dynamic_axes={"u": {0: "b"}}, opset_version=17, dynamo=False, custom_opsets={"com.microsoft": 1})
    out = ort_session(tmp_path / "s.onnx").run(None, {"u": user.numpy()})[0]
    assert np.abs(out - approx.numpy()).max() <= 1e-3  # the torch forward emulates ONNX Runtime's op


def test_bench_runs_graph_variants_of_one_model(tmp_path, tiny_cfg):
    from cddrec.benchmarks.latency import bench_table, run_bench

    ckpt = _ckpt(tmp_path, tiny_cfg)
    res = run_bench(str(ckpt), ["ort-cpu", "ort-cpu-int8:t1", "ort-cpu-rescore"], [1, 4], min_runs=2, min_seconds=0.01,
                    workdir=tmp_path / "w", echo=lambda m: None)
    by = {r["backend"]: r for r in res["results"]}
    assert set(by) == {"ort-cpu", "ort-cpu-int8:t1", "ort-cpu-rescore"}
    assert all("timings" in r and len(r["timings"]) == 2 for r in by.values()), res["results"]
    assert set(res["graph_variants"]) == {"ort-cpu-int8", "ort-cpu-rescore"}
    assert min(res["graph_variants"]["ort-cpu-int8"]["topk_overlap"].values()) >= APPROX_MIN_OVERLAP
    assert "ort-cpu-int8: graph of" in bench_table(res)  # parity stated beside the timings


def test_fused_int8_graph_parity_on_fresh_histories(tmp_path, tiny_cfg, make_histories):
    ckpt = _ckpt(tmp_path, tiny_cfg.replace(hidden_size=32, num_items=300))
    rep = export_model(ckpt, tmp_path / "fq.onnx", ExportOptions(k=10, optimize=True, int8=True))
    ops = {n.op_type for n in onnx.load(str(tmp_path / "fq.onnx")).graph.node}
    assert {"Attention", "MultiHeadAttention", "MatMulInteger"} <= ops
    assert min(rep.topk_overlap.values()) >= APPROX_MIN_OVERLAP
    _approximate_parity(ckpt, tmp_path / "fq.onnx", make_histories(300, 50, 12, seed=78))
