"""Top-k over large item tables: exact fp32 against an int8 table and two-stage top-k.

    python -m cddrec.benchmarks.catalogue_topk MODEL.pt DATA [--items 1000000] [--batch 64]

The scoring part of the graph (user embedding (B, d) -> masked scores (B, V) -> top-k) is built
as small ONNX graphs and run by ONNX Runtime CPU, the same code for quality and for speed:

- ``exact``: fp32 MatMul against the table, masking, TopK (what the exported graph does);
- ``int8``: the table in int8 with one scale per item (symmetric), the user vector quantized
  per batch (DynamicQuantizeMatMul, VNNI), masking, TopK: approximate scores, a quarter of
  the memory traffic;
- ``int8+rescore C``: two stages, the int8 scores' top C candidates, then their exact fp32
  scores (Gather of C rows, a batched MatMul) and the top-k of those;
- ``fp16``: the table in fp16 (if ONNX Runtime CPU runs an fp16 MatMul here).

Quality: the user embeddings of the real model (its fp32 graph) on the real split and catalogue;
R@10 and MRR of each variant, and how often its top-10 equals the exact top-10. Speed: a
synthetic table of ``--items`` rows (random normal, d of the model), batch ``--batch``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import click
import numpy as np
import onnx
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

from cddrec.contract import MASK_SCORE
from cddrec.errors import first_line
from cddrec.parity import topk_overlap
from cddrec.runtime.session import ort_session

from .record import RESULTS_DIR, cell, record
from .timer import time_calls

MS = "com.microsoft"


def _model(nodes, inputs, outputs, inits=()) -> onnx.ModelProto:
    graph = oh.make_graph(nodes, "topk", inputs, outputs, list(inits))
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17), oh.make_opsetid(MS, 1)])


def _masked_topk(scores: str, k: int | str, prefix: str) -> tuple[list, list]:
    """Nodes: scores (B, V) with the excluded ids set to MASK_SCORE, then TopK -> (prefix_s, prefix_i)."""
    inits = [nh.from_array(np.array(MASK_SCORE, np.float32), f"{prefix}mask"),
             nh.from_array(np.array([k], np.int64), f"{prefix}k")]
    nodes = [oh.make_node("Shape", ["excluded"], [f"{prefix}shape"]),
             oh.make_node("Expand", [f"{prefix}mask", f"{prefix}shape"], [f"{prefix}upd"]),
             oh.make_node("ScatterElements", [scores, "excluded", f"{prefix}upd"], [f"{prefix}masked"], axis=1),
             oh.make_node("TopK", [f"{prefix}masked", f"{prefix}k"], [f"{prefix}s", f"{prefix}i"], axis=1)]
    return nodes, inits


def _io(name, dtype, shape):
    return oh.make_tensor_value_info(name, dtype, shape)


def build(variant: str, d: int, k: int, candidates: int = 0) -> onnx.ModelProto:
    """Graph: user (B, d), excluded (B, S) int64, the table in the variant's layout -> top_items, top_scores."""
    outs = [_io("top_items", TP.INT64, ["B", k]), _io("top_scores", TP.FLOAT, ["B", k])]
    ins = [_io("user", TP.FLOAT, ["B", d]), _io("excluded", TP.INT64, ["B", "S"])]
    if variant == "exact":
        nodes, inits = _masked_topk("scores", k, "t")
        nodes = [oh.make_node("MatMul", ["user", "table_t"], ["scores"])] + nodes
        nodes += [oh.make_node("Identity", ["ti"], ["top_items"]), oh.make_node("Identity", ["ts"], ["top_scores"])]
        return _model(nodes, ins + [_io("table_t", TP.FLOAT, [d, "V"])], outs, inits)
    if variant == "fp16":
        nodes, inits = _masked_topk("scores", k, "t")
        nodes = [oh.make_node("Cast", ["user"], ["user16"], to=TP.FLOAT16),
                 oh.make_node("MatMul", ["user16", "table16_t"], ["scores16"]),
                 oh.make_node("Cast", ["scores16"], ["scores"], to=TP.FLOAT)] + nodes
        nodes += [oh.make_node("Identity", ["ti"], ["top_items"]), oh.make_node("Identity", ["ts"], ["top_scores"])]
        return _model(nodes, ins + [_io("table16_t", TP.FLOAT16, [d, "V"])], outs, inits)
    assert variant == "int8"
    ins += [_io("table_q_t", TP.INT8, [d, "V"]), _io("table_scale", TP.FLOAT, ["V"])]
    nodes = [oh.make_node("DynamicQuantizeMatMul", ["user", "table_q_t", "table_scale"], ["approx"], domain=MS)]
    if not candidates:
        n2, inits = _masked_topk("approx", k, "t")
        nodes += n2 + [oh.make_node("Identity", ["ti"], ["top_items"]), oh.make_node("Identity", ["ts"], ["top_scores"])]
        return _model(nodes, ins, outs, inits)
    n2, inits = _masked_topk("approx", candidates, "c")  # candidates ci (B, C)
    inits += [nh.from_array(np.array([k], np.int64), "k"), nh.from_array(np.array([2], np.int64), "ax2")]
    nodes += n2 + [
        oh.make_node("Gather", ["table", "ci"], ["cand"], axis=0),  # (B, C, d) fp32 rows
        oh.make_node("Unsqueeze", ["user", "ax2"], ["user3"]),  # (B, d, 1)
        oh.make_node("MatMul", ["cand", "user3"], ["exact3"]),  # (B, C, 1)
        oh.make_node("Squeeze", ["exact3", "ax2"], ["exact"]),  # (B, C)
        oh.make_node("TopK", ["exact", "k"], ["top_scores", "pos"], axis=1),
        oh.make_node("GatherElements", ["ci", "pos"], ["top_items"], axis=1)]
    return _model(nodes, ins + [_io("table", TP.FLOAT, ["V", d])], outs, inits)


def table_feeds(table: np.ndarray) -> dict[str, np.ndarray]:
    """The layouts every variant reads, from the fp32 table (V, d)."""
    scale = np.maximum(np.abs(table).max(1), 1e-12) / 127.0  # (V,): symmetric, one scale per item
    q = np.clip(np.rint(table / scale[:, None]), -127, 127).astype(np.int8)
    return {"table_t": np.ascontiguousarray(table.T), "table": table,
            "table_q_t": np.ascontiguousarray(q.T), "table_scale": scale.astype(np.float32),
            "table16_t": np.ascontiguousarray(table.T.astype(np.float16))}


VARIANTS = [("exact", 0), ("fp16", 0), ("int8", 0), ("int8+rescore", 50), ("int8+rescore", 100),
            ("int8+rescore", 200), ("int8+rescore", 400)]


def sessions(d: int, k: int, threads: int, workdir: Path):
    out = {}
    for variant, c in VARIANTS:
        label = f"{variant} {c}" if c else variant
        path = workdir / f"{label.replace(' ', '_').replace('+', '_')}.onnx"
        onnx.save(build(variant.split("+")[0], d, k, c), str(path))
        try:
            out[label] = ort_session(path, threads=threads)  # the serving session factory
        except Exception as e:  # noqa: BLE001 - a variant this ONNX Runtime cannot run is reported
            out[label] = f"{type(e).__name__}: {first_line(e, 120)}"
    return out


def run_variant(sess, feeds: dict, user: np.ndarray, excluded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    names = {i.name for i in sess.get_inputs()}
    feed = {n: feeds[n] for n in names if n in feeds}
    feed.update(user=user, excluded=excluded)
    return sess.run(["top_items", "top_scores"], feed)


def quality(model_pt: str, data: str, k: int, threads: int, workdir: Path, echo=print) -> dict:
    """Recall of each variant on the real split and catalogue, against the exact top-k."""
    from cddrec.checkpoint import load_checkpoint
    from cddrec.data import eval_split, load_data
    from cddrec.export.onnx_export import ExportOptions, export_model
    from cddrec.runtime.backends import OrtCpu
    from cddrec.vocab import Vocab

    from .graph_quality import full_histories

    model, ckpt = load_checkpoint(model_pt)
    ds = load_data(data, kcore=ckpt["train_config"]["kcore"], vocab=Vocab.from_dict(ckpt["vocab"]))
    split = eval_split(ds, "test", model.cfg.max_len)
    export_model(model_pt, workdir / "q.onnx", ExportOptions(k=k))
    be = OrtCpu(workdir / "q.onnx", threads=threads)
    table = model.item_emb.weight.detach().float().numpy()  # (V, d)
    feeds = table_feeds(table)
    sess = sessions(table.shape[1], k, threads, workdir)
    tops: dict[str, list] = {name: [] for name, s in sess.items() if not isinstance(s, str)}
    graph_top = []
    for start in range(0, len(split), 256):
        rows = np.arange(start, min(start + 256, len(split)))
        hist = full_histories(split, rows)  # (B, S)
        out = be.infer({"item_ids": hist})
        graph_top.append(out["top_items"])
        excluded = np.concatenate([hist, np.full((len(rows), 1), model.cfg.num_items + 1)], axis=1)  # + mask token
        for name in tops:
            tops[name].append(run_variant(sess[name], feeds, out["user_embedding"], excluded)[0])
    res = {}
    exact = np.concatenate(tops["exact"])
    for name, parts in tops.items():
        top = np.concatenate(parts)
        hit = top == split.targets[:, None]  # (U, k)
        rr = np.where(hit.any(1), 1.0 / (hit.argmax(1) + 1.0), 0.0)  # reciprocal rank within the top-k
        res[name] = {"R@10": float(hit[:, :10].any(1).mean()), "MRR@10": float(rr.mean()), "same_topk_as_exact": float(
            np.mean([set(a) == set(b) for a, b in zip(top.tolist(), exact.tolist())]))}
        echo(f"  {name}: {res[name]}")
    res["exact"]["same_as_graph"] = float(np.mean(np.concatenate(graph_top) == exact))
    for name, s in sess.items():
        if isinstance(s, str):
            res[name] = {"error": s}
    return {"dataset": Path(data).stem, "users": len(split), "items": model.cfg.num_items, "variants": res}


def speed(items: int, d: int, batch: int, k: int, threads: int, min_seconds: float, workdir: Path,
          echo=print) -> dict:
    """users/s of each variant on a random table of ``items`` rows (batch ``batch``, history 20)."""
    rng = np.random.default_rng(0)
    table = rng.standard_normal((items + 2, d), dtype=np.float32) * 0.1
    feeds = table_feeds(table)
    sess = sessions(d, k, threads, workdir)
    users = [rng.standard_normal((batch, d), dtype=np.float32) for _ in range(4)]
    excl = [rng.integers(1, items, size=(batch, 20)) for _ in range(4)]
    out = {}
    exact_top = run_variant(sess["exact"], feeds, users[0], excl[0])[0]
    for name, s in sess.items():
        if isinstance(s, str):
            out[name] = {"error": s}
            continue
        top = run_variant(s, feeds, users[0], excl[0])[0]
        overlap = topk_overlap(top, exact_top)
        t = time_calls(lambda i, s=s: run_variant(s, feeds, users[i % 4], excl[i % 4]), batch, warmup=2,
                       min_runs=5, min_seconds=min_seconds)
        out[name] = {"p50_ms": t.p50_ms, "users_per_s": t.users_per_s, "runs": t.runs, "overlap_with_exact": overlap}
        echo(f"  {name}: {out[name]}")
    base = out["exact"]["users_per_s"]
    for r in out.values():
        if "users_per_s" in r:
            r["x_exact"] = r["users_per_s"] / base
    return {"items": items, "d": d, "batch": batch, "variants": out}


def make_table(q: dict, s: dict) -> str:
    rows = ["| variant | R@10 | MRR@10 | R@10 rel. to exact | top-10 = exact | users/s (synthetic) | x exact | p50 ms | "
            "top-10 overlap with exact (synthetic) |", "|---|---|---|---|---|---|---|---|---|"]
    ex = q["variants"]["exact"]["R@10"]
    for name, r in q["variants"].items():
        sp = s["variants"].get(name, {})
        if "error" in r:
            rows.append(f"| {name} | - | - | - | - | - | - | not run: {r['error']} |")
            continue
        rows.append(f"| {name} | {r['R@10']:.4f} | {r['MRR@10']:.4f} | {(r['R@10'] - ex) / ex * 100:+.2f}% | "
                    f"{r['same_topk_as_exact']:.3f} | {cell(sp.get('users_per_s'), ',.0f')} | "
                    f"{cell(sp.get('x_exact'), '.2f')} | {cell(sp.get('p50_ms'), '.1f')} | "
                    f"{cell(sp.get('overlap_with_exact'), '.3f')} |")
    same = q["variants"]["exact"].get("same_as_graph")
    rows += ["", f"Quality: {q['dataset']} test split, {q['users']:,} users, the real catalogue of {q['items']:,} items, "
             "user embeddings from the model's fp32 graph (its exact top-10 equals the exact variant's in "
             f"{cell(None if same is None else same * 100, '.1f')}% of positions). "
             f"Speed: a random table of {s['items']:,} x {s['d']} items, batch {s['batch']}, ONNX Runtime CPU."]
    return "\n".join(rows)


@click.command()
@click.argument("model_pt", type=click.Path(exists=True, dir_okay=False))
@click.argument("data", type=click.Path(exists=True, dir_okay=False))
@click.option("--items", default=1_000_000, show_default=True, help="rows of the synthetic table (speed)")
@click.option("--batch", default=64, show_default=True)
@click.option("--threads", default=0, show_default=True)
@click.option("--min-seconds", default=3.0, show_default=True)
@click.option("--name", default="catalogue_topk", show_default=True)
@click.option("--out", "out_dir", default=str(RESULTS_DIR), show_default=True)
def main(model_pt, data, items, batch, threads, min_seconds, name, out_dir):
    k = 10  # R@10 and MRR@10 of the top-10
    echo = lambda m: click.echo(m, err=True)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="cddrec-cat-") as tmp:
        echo("quality on the real data ...")
        q = quality(model_pt, data, k, threads, Path(tmp), echo)
        echo(f"speed on {items:,} items ...")
        s = speed(items, _dim(model_pt), batch, k, threads, min_seconds, Path(tmp), echo)
    md = make_table(q, s)
    record(name, {"quality": q, "speed": s}, md, out_dir, title="Top-k over large item tables")
    click.echo(md)


def _dim(model_pt: str) -> int:
    from cddrec.checkpoint import read_checkpoint

    return int(read_checkpoint(model_pt)["model_config"]["hidden_size"])


if __name__ == "__main__":
    main()
