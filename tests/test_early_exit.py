"""Early exit (``cddrec-export --steps S``, ``cddrec-eval --steps S``): the state after the first S of
the T reverse steps, cut in one place (``GaussianDiffusion.timesteps``) and used by the model, the
evaluation, the unrolled and the fused graph; the graph's contract records S and validation compares
the graph with the S-step reference."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from cddrec.checkpoint import load_checkpoint
from cddrec.config import ModelConfig
from cddrec.contract import GraphContract
from cddrec.errors import ExportError, ModelFileError
from cddrec.export.fusion import DEFAULT_FUSIONS, FUSIONS, FusedRecommender
from cddrec.export.graph import UnrolledRecommender
from cddrec.export.metadata import read_metadata
from cddrec.export.onnx_export import ExportOptions, export_model
from cddrec.flops import flops_by_operand, flops_per_user
from cddrec.inference import reference_runner, reference_topk
from cddrec.model import CDDRec
from cddrec.parity import compare_runners
from cddrec.runtime.backends import load_backend


# ------------------------------------------------------------------------------ the chain
def test_timesteps_cut_after_s(tiny_model):
    T = tiny_model.cfg.steps  # 4
    diffusion = tiny_model.diffusion
    assert list(diffusion.timesteps()) == list(diffusion.timesteps(T)) == [3, 2, 1, 0]
    assert list(diffusion.timesteps(1)) == [3] and list(diffusion.timesteps(3)) == [3, 2, 1]
    for bad in (0, T + 1, -1, 2.0, True):
        with pytest.raises(ValueError, match="between 1 and T=4"):
            diffusion.timesteps(bad)


def test_reverse_stops_at_the_stage_state(tiny_model, make_histories):
    """The state after S steps is the S-th of the full chain's states, on every path (plain, hoisted,
    last position), and the sampled chain with explicit noise stops there too."""
    ids = make_histories(tiny_model.cfg.num_items, 5, tiny_model.cfg.max_len, seed=1)
    with torch.no_grad():
        e_s, bias = tiny_model.encode(ids)
        _, states = tiny_model.diffusion.reverse(tiny_model.decoder, e_s, bias, last_only=True, return_all=True)
        for S in (1, 2, 4):
            last, part = tiny_model.diffusion.reverse(tiny_model.decoder, e_s, bias, last_only=True, steps=S,
                                                      return_all=True)
            assert len(part) == S and torch.equal(last, states[S - 1])
            plain, _ = tiny_model.diffusion.reverse(tiny_model.decoder, e_s, bias, hoist=False, steps=S)
            torch.testing.assert_close(plain[:, -1:], states[S - 1], rtol=1e-5, atol=1e-5)
            assert torch.equal(tiny_model.user_embedding(ids, steps=S), states[S - 1][:, 0])
        assert not torch.allclose(states[0], states[-1], atol=1e-4)  # the cut is visible: S=1 is not the end
        noise = torch.randn(4, 5, tiny_model.cfg.hidden_size, generator=torch.Generator().manual_seed(0))
        x2 = tiny_model.user_embedding(ids, noise, steps=2)
        torch.testing.assert_close(tiny_model.user_embedding(ids, noise, plain=True, steps=2), x2, rtol=1e-5,
                                   atol=1e-5)
        assert not torch.allclose(x2, tiny_model.user_embedding(ids, steps=2))  # steps T-1, T-2 add noise


@pytest.mark.parametrize("fused", [None, DEFAULT_FUSIONS, FUSIONS])
@pytest.mark.parametrize("stochastic", [False, True])
def test_graph_modules_follow_the_s_step_reference(tiny_model, make_histories, fused, stochastic):
    """The unrolled and the fused module (every fusion, the merged LayerNorm too) run the one reverse
    loop: S steps give the S-step reference, S = T the default module."""
    cfg = tiny_model.cfg
    ids = make_histories(cfg.num_items, 6, cfg.max_len + 2, seed=2)
    noise = torch.randn(cfg.steps, 6, cfg.hidden_size, generator=torch.Generator().manual_seed(1)) if stochastic \
        else None
    args = (ids, noise) if stochastic else (ids,)

    def module(steps):
        if fused is None:
            return UnrolledRecommender(tiny_model, 7, stochastic=stochastic, steps=steps)
        return FusedRecommender(tiny_model, 7, stochastic=stochastic, fusions=fused, steps=steps)

    with torch.no_grad():
        for S in (1, 3):
            items, scores, user = module(S)(*args)
            ref_items, ref_scores, ref_user = reference_topk(tiny_model, ids, 7, noise, steps=S)
            torch.testing.assert_close(user, ref_user, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(scores, ref_scores, rtol=1e-4, atol=1e-5)
        full = module(None)(*args)
        for a, b in zip(module(cfg.steps)(*args), full):
            assert torch.equal(a, b)
        assert not torch.allclose(module(1)(*args)[2], full[2], atol=1e-4)


def test_module_refuses_a_bad_s(tiny_model, tiny_cfg):
    with pytest.raises(ValueError, match="between 1 and T=4"):
        UnrolledRecommender(tiny_model, 5, steps=5)
    with pytest.raises(ValueError, match="decoder"):
        UnrolledRecommender(CDDRec(tiny_cfg.replace(decoder=False)), 5, steps=1)


# --------------------------------------------------------------------------- the contract
def test_contract_records_s():
    c = GraphContract(k=5, steps=20, hidden=8, max_len=4, num_items=10, steps_run=2)
    meta = c.to_metadata()
    assert meta["T"] == "20" and meta["S"] == "2"
    back = GraphContract.from_metadata(meta)
    assert back.steps_run == 2 and back.steps == 20 and "S" not in back.extra
    full = GraphContract(k=5, steps=20, hidden=8, max_len=4, num_items=10)
    assert full.steps_run == 20 and full.to_metadata()["S"] == "20"
    old = {k: v for k, v in full.to_metadata().items() if k != "S"}  # graphs exported before early exit
    assert GraphContract.from_metadata(old).steps_run == 20
    assert GraphContract(k=5, steps=0, hidden=8, max_len=4, num_items=10).steps_run == 0
    for bad in ("0", "21", "x"):
        with pytest.raises(ModelFileError, match="'S'|S must be between 1 and T=20"):
            GraphContract.from_metadata({**meta, "S": bad}, "g.onnx")
    with pytest.raises(ValueError, match="no decoder"):
        GraphContract(k=5, steps=0, hidden=8, max_len=4, num_items=10, steps_run=1)


def test_flops_count_the_steps_run():
    cfg = ModelConfig(num_items=1000, hidden_size=32, num_heads=2, max_len=10, steps=20)
    full, five = flops_per_user(cfg), flops_per_user(cfg, steps=5)
    assert five["decoder_steps"] == pytest.approx(full["decoder_steps"] / 4)
    assert five["encoder"] == full["encoder"] and five["decoder_kv"] == full["decoder_kv"]
    assert five["total"] < full["total"] and flops_per_user(cfg, steps=20) == full
    assert sum(flops_by_operand(cfg, steps=5).values()) == pytest.approx(five["total"])
    assert flops_per_user(cfg, plain=True, steps=5)["decoder_steps"] == pytest.approx(
        flops_per_user(cfg, plain=True)["decoder_steps"] / 4)
    with pytest.raises(ValueError):
        flops_per_user(cfg, steps=21)


# ------------------------------------------------------------------------------ the graph
def _parity(graph, model, steps, seed=5):
    rng = np.random.default_rng(seed)
    feeds = {}
    for B in (1, 9):
        ids = rng.integers(1, model.cfg.num_items + 1, size=(B, model.cfg.max_len + 1))
        ids[:, : rng.integers(0, model.cfg.max_len)] = 0
        feeds[str(B)] = {"item_ids": ids}
    be = load_backend(graph, "ort-cpu")
    try:
        return compare_runners({"graph": be.infer}, reference_runner(model, steps=steps), feeds,
                               **be.contract.parity_rule("cpu"))
    finally:
        be.close()


def test_s_step_graph_equals_the_s_step_reference(tmp_path, trained_tiny, trained_tiny_onnx):
    model, _ = load_checkpoint(trained_tiny)
    T = model.steps
    rep = export_model(trained_tiny, tmp_path / "s2.onnx", ExportOptions(k=10, steps=2))
    assert rep.contract["steps_run"] == 2 and rep.validated_on == ["cpu"]
    meta = read_metadata(tmp_path / "s2.onnx")
    assert meta["S"] == "2" and meta["T"] == str(T)
    assert _parity(tmp_path / "s2.onnx", model, 2).ok
    assert not _parity(tmp_path / "s2.onnx", model, None).ok  # it is not the T-step graph
    assert sum(rep.ops.values()) < sum(export_model(trained_tiny, tmp_path / "full.onnx").ops.values())
    # S = T is the default graph: same nodes, same outputs
    export_model(trained_tiny, tmp_path / "sT.onnx", ExportOptions(k=10, steps=T))
    a, b = onnx.load(str(tmp_path / "sT.onnx")), onnx.load(str(trained_tiny_onnx))
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    feed = {"item_ids": np.random.default_rng(0).integers(0, model.cfg.num_items + 1, size=(5, 9))}
    out_a = load_backend(tmp_path / "sT.onnx", "ort-cpu").infer(feed)
    out_b = load_backend(trained_tiny_onnx, "ort-cpu").infer(feed)
    assert all(np.array_equal(out_a[k], out_b[k]) for k in out_b)
    assert read_metadata(trained_tiny_onnx)["S"] == str(T)


def test_s_step_fused_and_stochastic_graphs_validate(tmp_path, trained_tiny):
    rep = export_model(trained_tiny, tmp_path / "f.onnx", ExportOptions(k=10, steps=1, optimize=True))
    assert rep.contract["steps_run"] == 1 and "MultiHeadAttention" in rep.ops_optimized
    assert _parity(tmp_path / "f.onnx", load_checkpoint(trained_tiny)[0], 1).ok
    rep = export_model(trained_tiny, tmp_path / "s.onnx", ExportOptions(k=10, steps=3, stochastic=True))
    assert rep.contract["steps_run"] == 3 and rep.parity  # validated with noise against the 3-step reference


def test_export_refuses_a_bad_s(tmp_path, trained_tiny, tiny_cfg):
    with pytest.raises(ExportError, match="--steps 0 must be >= 1"):
        ExportOptions(steps=0)
    with pytest.raises(ExportError, match="T=4 reverse steps; early exit takes S between 1 and 4"):
        export_model(trained_tiny, tmp_path / "x.onnx", ExportOptions(steps=5))
    assert not (tmp_path / "x.onnx").exists()
    from cddrec.checkpoint import save_checkpoint
    from cddrec.vocab import Vocab

    sasrec = CDDRec(tiny_cfg.replace(decoder=False))
    save_checkpoint(tmp_path / "sasrec.pt", sasrec, Vocab.build(str(i) for i in range(tiny_cfg.num_items)),
                    torch.ones(tiny_cfg.num_rows, dtype=torch.long))
    with pytest.raises(ExportError, match="no decoder"):
        export_model(tmp_path / "sasrec.pt", tmp_path / "y.onnx", ExportOptions(steps=1))
    from cddrec.app.export import main as export_main

    r = CliRunner().invoke(export_main, [str(trained_tiny), "-o", str(tmp_path / "z.onnx"), "--steps", "9"])
    assert r.exit_code == 1 and "early exit takes S between 1 and 4" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(export_main, [str(trained_tiny), "-o", str(tmp_path / "z.onnx"), "--steps", "2"])
    assert r.exit_code == 0 and "early exit: the graph runs 2 of the model's 4 reverse steps" in r.output


# ---------------------------------------------------------------------------- evaluation
def test_eval_steps_equals_the_stages_row(trained_tiny, tiny_data_file):
    from cddrec.app.evaluate import main as eval_main

    runner = CliRunner()
    r = runner.invoke(eval_main, [str(trained_tiny), str(tiny_data_file), "--json", "--stages"])
    assert r.exit_code == 0, r.output
    stages = json.loads(r.stdout)["stages"]
    assert [s["step"] for s in stages] == [3, 2, 1, 0]
    rows = []
    for S in (1, 2, 4):
        r = runner.invoke(eval_main, [str(trained_tiny), str(tiny_data_file), "--json", "--steps", str(S)])
        assert r.exit_code == 0, r.output
        out = json.loads(r.stdout)
        assert out["steps"] == {"run": S, "of": 4}
        for key in ("R@10", "N@10", "MRR@40", "AvgChange@40"):
            assert out[key] == pytest.approx(stages[S - 1][key], abs=1e-12), (S, key)
        rows.append(out)
    assert rows[0]["AvgChange@40"] != rows[-1]["AvgChange@40"]  # S=1 scores another state (ranks may agree)
    r = runner.invoke(eval_main, [str(trained_tiny), str(tiny_data_file), "--steps", "2", "--stages", "--json"])
    assert [s["step"] for s in json.loads(r.stdout)["stages"]] == [3, 2]
    r = runner.invoke(eval_main, [str(trained_tiny), str(tiny_data_file), "--steps", "5"])
    # the library's check (GaussianDiffusion.timesteps, the one place the chain's length is decided), one line
    assert r.exit_code == 1 and "steps must be an integer between 1 and T=4" in r.output and "Traceback" not in r.output
    from cddrec.checkpoint import load_checkpoint
    from cddrec.evaluation import evaluate_file
    from cddrec.vocab import Vocab

    net, ckpt = load_checkpoint(trained_tiny)
    with pytest.raises(ValueError, match="between 1 and T=4"):  # before the data is read: this file does not exist
        evaluate_file(net, Vocab.from_dict(ckpt["vocab"]), tiny_data_file.parent / "absent.txt", steps=5)



def test_early_exit_benchmark_rows(tmp_path, trained_tiny, tiny_data_file):
    """``python -m cddrec.benchmarks.early_exit``: per S the exported graph's ops, its timing and the
    quality of ``cddrec-eval --steps S``, in one table."""
    from cddrec.benchmarks.early_exit import run, table
    from cddrec.evaluation import evaluate_file
    from cddrec.vocab import Vocab

    rep = run(trained_tiny, [1, 4], ["ort-cpu"], [1, 8], 0.05, str(tiny_data_file), tmp_path, echo=lambda m: None,
              rounds=2)
    rows = rep["rows"]
    assert len(rows[0]["rounds"]) == 2  # each figure is the median of the two rounds
    p50s = [r["results"][0]["timings"][0]["p50_ms"] for r in rows[0]["rounds"]]
    assert rows[0]["bench"][0]["timings"][0]["p50_ms"] == pytest.approx(sum(p50s) / 2)
    assert [r["S"] for r in rows] == [1, 4] and rows[0]["ops"] < rows[1]["ops"]
    assert rows[0]["flops_per_user"] < rows[1]["flops_per_user"]
    model, ckpt = load_checkpoint(trained_tiny)
    want = evaluate_file(model, Vocab.from_dict(ckpt["vocab"]), tiny_data_file, "test", steps=1).metrics
    assert rows[0]["quality"]["MRR@40"] == want["MRR@40"]
    assert [t["batch"] for t in rows[0]["bench"][0]["timings"]] == [1, 8]
    text = table(rep, [1, 8])
    assert "| 1 | " in text and "ort-cpu batch 8 users/s" in text and "R@10" in text
