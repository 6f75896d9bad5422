"""Command-line entry points. They parse options and call library functions, nothing more."""

from __future__ import annotations

import functools
import json
import sys
from dataclasses import asdict, fields
from pathlib import Path

import click

from .config import CDDRecConfig, preset_for, read_config_file

SKIP_FIELDS = {"num_items", "extra"}


def friendly_errors(fn):
    """Turn expected errors (bad data, bad model files, bad settings) into one-line messages."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .checkpoint import CheckpointError
        from .data import DataError

        try:
            return fn(*args, **kwargs)
        except (DataError, CheckpointError, ValueError, FileNotFoundError) as e:
            raise click.ClickException(str(e)) from e
        except RuntimeError as e:
            if type(e).__name__ in ("TensorRTUnavailable", "BackendUnavailable"):
                raise click.ClickException(str(e)) from e
            raise

    return wrapper


def config_options(fn):
    """One option per config field (``hidden_size`` -> ``--hidden-size``), default: unset."""
    for f in reversed(fields(CDDRecConfig)):
        if f.name in SKIP_FIELDS:
            continue
        flag = f.name.replace("_", "-")
        help_ = f.metadata.get("help", "") + f" [default: {f.default}]"
        if isinstance(f.default, bool):
            fn = click.option(f"--{flag}/--no-{flag}", f.name, default=None, help=help_)(fn)
        else:
            fn = click.option(f"--{flag}", f.name, type=type(f.default), default=None, help=help_)(fn)
    return fn


def data_options(fn):
    opts = [
        click.option("--user-col", default="user", show_default=True, help="user column of CSV/TSV/Parquet logs"),
        click.option("--item-col", default="item", show_default=True, help="item column"),
        click.option("--time-col", default="timestamp", show_default=True,
                     help="timestamp column ('' = file order is time order)"),
        click.option("--sep", default=None, help="CSV field separator [default: ',' or tab for .tsv]"),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _data_kwargs(user_col, item_col, time_col, sep) -> dict:
    return {"user_col": user_col, "item_col": item_col, "time_col": time_col or None, "sep": sep}


def build_config(data: str | None, config_file: str | None, preset: bool, overrides: dict) -> CDDRecConfig:
    """Defaults <- dataset preset <- config file <- command-line flags."""
    values: dict = {}
    if preset and data:
        values.update(preset_for(data))
    if config_file:
        values.update(read_config_file(config_file))
    values.update({k: v for k, v in overrides.items() if v is not None})
    return CDDRecConfig(**values)


# ----------------------------------------------------------------------------- train
@click.command(context_settings={"max_content_width": 110})
@click.argument("data", type=click.Path(dir_okay=False))
@click.option("--out", "-o", default="model.pt", show_default=True, type=click.Path(dir_okay=False),
              help="model file to write (the best model by validation)")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="YAML or JSON file of config fields; flags override it")
@click.option("--preset/--no-preset", default=True, show_default=True,
              help="apply the paper's per-dataset settings when DATA is one of its four Amazon files")
@click.option("--resume", is_flag=True, help="continue from OUT.resume.pt")
@click.option("--quiet", is_flag=True, help="no progress bar")
@click.option("--summary-json", type=click.Path(dir_okay=False), help="write the training summary here")
@data_options
@config_options
@friendly_errors
def train_main(data, out, config_file, preset, resume, quiet, summary_json, user_col, item_col, time_col,
               sep, **overrides):
    """Train CDDRec on DATA (`user item item ...` lines, or a CSV/TSV/Parquet log)."""
    from .data import load_data
    from .io import atomic_write_json
    from .training import train

    cfg = build_config(data, config_file, preset, overrides)
    ds = load_data(data, kcore=cfg.kcore, **_data_kwargs(user_col, item_col, time_col, sep))
    summary = train(cfg, ds, out, resume=resume, progress=not quiet and sys.stderr.isatty(),
                    log=lambda m: click.echo(m, err=True))
    click.echo(f"wrote {out}: best epoch {summary['best_epoch']}, valid "
               + " ".join(f"{k} {summary['best_valid'].get(k, float('nan')):.4f}" for k in ("R@10", "N@10", "MRR")))
    if summary_json:
        atomic_write_json(summary_json, {"model": str(out), "config": asdict(cfg), **summary})


# ------------------------------------------------------------------------------ eval
@click.command(context_settings={"max_content_width": 110})
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("data", type=click.Path(dir_okay=False))
@click.option("--split", type=click.Choice(["test", "valid"]), default="test", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
@click.option("--save-topk", type=click.Path(dir_okay=False), help="write JSONL top-k lists here")
@click.option("--topk", default=40, show_default=True, help="list length for --save-topk")
@click.option("--stages", is_flag=True, help="also rank with every intermediate denoising state")
@click.option("--batch-size", default=512, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@data_options
@friendly_errors
def eval_main(model, data, split, as_json, save_topk, topk, stages, batch_size, device, user_col, item_col,
              time_col, sep):
    """Evaluate MODEL on DATA: leave-one-out, full ranking, seen items excluded."""
    from .checkpoint import load_checkpoint
    from .data import Vocab, load_data
    from .evaluation import evaluate_data, format_table, write_topk
    from .training import resolve_device

    net, ckpt = load_checkpoint(model)
    net.to(resolve_device(device))
    vocab = Vocab.from_dict(ckpt["vocab"])
    ds = load_data(data, kcore=net.cfg.kcore, vocab=vocab, **_data_kwargs(user_col, item_col, time_col, sep))
    if ckpt.get("data", {}).get("fingerprint") not in (None, ds.fingerprint()):
        click.echo(f"warning: {data} differs from the data {model} was trained on", err=True)
    res = evaluate_data(net, ds, split, batch_size=batch_size, stages=stages, keep_topk=topk if save_topk else 0,
                        progress=sys.stderr.isatty())
    out = {"dataset": Path(data).stem, "split": split, "model": str(model), **res.metrics}
    if stages:
        out["stages"] = res.stages
    if save_topk:
        n = write_topk(save_topk, ds, res, vocab)
        click.echo(f"wrote {n} top-{topk} lists to {save_topk}", err=True)
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    keys = ["R@1", "R@5", "R@10", "R@20", "N@5", "N@10", "N@20", "MRR", "MRR@40", "AvgChange@40"]
    click.echo(f"{out['dataset']} {split}: {res.metrics['users']} users")
    click.echo(format_table([res.metrics], keys))
    if stages:
        click.echo(format_table(res.stages, ["stage", "step", "R@10", "N@10", "MRR@40", "AvgChange@40"]))


# ------------------------------------------------------------------------------ demo
@click.command(context_settings={"max_content_width": 110})
@click.option("--out", "out_dir", default="cddrec-demo", show_default=True, type=click.Path(file_okay=False),
              help="folder for the demo's data and model")
@click.option("--minutes", default=1.0, show_default=True, help="training time budget")
@click.option("--seed", default=0, show_default=True)
@friendly_errors
def demo_main(out_dir, minutes, seed):
    """Train and evaluate on a seeded synthetic dataset with planted sequential structure."""
    from .demo import run_demo

    run_demo(out_dir, minutes=minutes, seed=seed, echo=click.echo)


# ---------------------------------------------------------------------------- export
@click.command(context_settings={"max_content_width": 110})
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--out", "-o", type=click.Path(dir_okay=False), help="graph file [default: MODEL with .onnx]")
@click.option("--k", default=10, show_default=True, help="top-k items the graph returns")
@click.option("--opset", default=17, show_default=True)
@click.option("--fp16", is_flag=True, help="fp16 matmuls; LayerNorm, softmax, scoring and TopK stay fp32")
@click.option("--stochastic", is_flag=True, help="add a noise input (T, batch, d): the sampled reverse chain")
@click.option("--optimize", is_flag=True,
              help="the fused graph: ONNX Runtime contrib ops (attention, BiasGelu); ONNX Runtime only, not --trt")
@click.option("--int8", is_flag=True,
              help="int8 MatMuls (dynamic quantization; with --optimize, of the fused graph), validated by top-k overlap")
@click.option("--int8-scoring", is_flag=True, help="with --int8: the scoring MatMul in int8 too")
@click.option("--rescore", default=0, show_default=True,
              help="two-stage top-k for large catalogues: int8 scores pick this many candidates, rescored in fp32")
@click.option("--exporter", type=click.Choice(["torchscript", "dynamo"]), default="torchscript", show_default=True)
@click.option("--vocab-sidecar/--vocab-inline", default=None,
              help="item vocabulary in MODEL.vocab.json beside the graph, or in its metadata "
                   "[default: inline up to 200k items]")
@click.option("--trt", "trt_engine", type=click.Path(dir_okay=False), help="also build a TensorRT engine here")
@click.option("--trt-fp16", is_flag=True, help="fp16 TensorRT engine")
@click.option("--trt-max-batch", default=1024, show_default=True)
@click.option("--trt-opt-batch", default=256, show_default=True)
@click.option("--no-validate", is_flag=True, help="skip validation (not recommended)")
@click.option("--json", "as_json", is_flag=True, help="print the export report as JSON")
@friendly_errors
def export_main(model, out, k, opset, fp16, stochastic, optimize, int8, int8_scoring, rescore, exporter, vocab_sidecar,
                trt_engine, trt_fp16, trt_max_batch, trt_opt_batch, no_validate, as_json):
    """Export MODEL (model.pt) to one ONNX graph: encoder, T unrolled denoising steps, scoring,
    seen-item masking and top-k; validated against PyTorch before it is kept."""
    from .export.onnx_export import export_model
    from .export.quantize import INT8_MIN_OVERLAP

    out = out or str(Path(model).with_suffix(".onnx"))
    rep = export_model(model, out, k=k, opset=opset, fp16=fp16, stochastic=stochastic, optimize=optimize,
                       exporter=exporter, vocab_sidecar=vocab_sidecar, trt_engine=trt_engine, trt_fp16=trt_fp16,
                       trt_max_batch=trt_max_batch, trt_opt_batch=trt_opt_batch, validate=not no_validate,
                       int8=int8, int8_scoring=int8_scoring, rescore=rescore)
    if as_json:
        click.echo(json.dumps(asdict(rep), indent=2))
        return
    click.echo(f"wrote {rep.path} ({rep.graph_bytes / 1e6:.2f} MB, {sum(rep.ops.values())} ops"
               + (f" -> {sum(rep.ops_optimized.values())} after optimization" if rep.ops_optimized else "") + ")")
    if rep.max_abs_diff:
        diffs = ", ".join(f"batch {b}: {v:.2e}" for b, v in rep.max_abs_diff.items())
        click.echo(f"validated against PyTorch: max |score diff| {diffs}; top-k mismatches beyond ties: "
                   f"{rep.topk_mismatches}; ORT session {rep.session_seconds * 1000:.0f} ms")
    if rep.topk_overlap:
        click.echo("approximate graph: top-k overlap with the fp32 reference " + ", ".join(
            f"batch {b}: {v:.3f}" for b, v in rep.topk_overlap.items()) + f" (declared minimum {INT8_MIN_OVERLAP})")
    if rep.vocab_sidecar:
        click.echo(f"wrote {rep.vocab_sidecar}")
    if rep.trt_engine:
        click.echo(f"wrote TensorRT engine {rep.trt_engine}")


# ----------------------------------------------------------------------------- infer
@click.command(context_settings={"max_content_width": 110})
@click.option("--model", "model_path", required=True, type=click.Path(dir_okay=False),
              help="exported graph (.onnx), TensorRT engine (with --backend trt) or model.pt (--backend torch)")
@click.option("--batch", "input_path", required=True, type=click.Path(dir_okay=False),
              help="requests: JSONL {\"user\": key, \"history\": [item keys]} or a CSV/TSV/Parquet log")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False), help="recommendations file")
@click.option("--k", type=int, default=None, help="items per user [default: the graph's K]")
@click.option("--batch-size", default=256, show_default=True)
@click.option("--backend", type=click.Choice(["ort-cpu", "ort-cuda", "trt", "torch"]), default="ort-cpu",
              show_default=True)
@click.option("--threads", default=0, show_default=True, help="CPU threads (0 = all cores)")
@click.option("--strict", is_flag=True, help="stop at the first bad line, exit non-zero, write no output")
@click.option("--output-format", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True)
@click.option("--input-format", type=click.Choice(["jsonl", "log"]), default=None,
              help="[default: log for .csv/.tsv/.parquet, else jsonl]")
@click.option("--allow-duplicates", is_flag=True, help="do not check for repeated users (saves memory)")
@click.option("--quiet", is_flag=True, help="no progress bar")
@data_options
@friendly_errors
def infer_main(model_path, input_path, output, k, batch_size, backend, threads, strict, output_format, input_format,
               allow_duplicates, quiet, user_col, item_col, time_col, sep):
    """Batched top-k recommendations for a file of user histories, original item keys in and out."""
    from .runtime.batch import run_batch
    from .runtime.recommender import Recommender

    rec = Recommender.load(model_path, backend=backend, threads=threads, k=k)
    stats = run_batch(rec, input_path, output, k=k, batch_size=batch_size, strict=strict,
                      output_format=output_format, in_format=input_format, check_duplicates=not allow_duplicates,
                      progress=not quiet and sys.stderr.isatty(),
                      log_options=_data_kwargs(user_col, item_col, time_col, sep))
    click.echo(stats.summary(), err=True)
    click.echo(f"wrote {output}" + (f"; bad lines in {stats.errors_path}" if stats.errors_path else ""), err=True)


# ----------------------------------------------------------------------------- bench
def _int_list(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {s!r}") from None


@click.command(context_settings={"max_content_width": 110})
@click.option("--model", default="random", show_default=True,
              help="model.pt, model.onnx, or 'random' (random weights of the given size)")
@click.option("--backends", default="torch,torch-fast,torch-compile,ort-cpu,ort-cuda,trt", show_default=True)
@click.option("--batch-sizes", default="1,8,64,256,1024", show_default=True)
@click.option("--items", default=12101, show_default=True, help="catalogue size of the random model")
@click.option("--k", default=10, show_default=True)
@click.option("--threads", default=0, show_default=True, help="CPU threads (0 = all cores)")
@click.option("--min-seconds", default=1.0, show_default=True, help="timed seconds per backend and batch size")
@click.option("--catalogue-sizes", default="", help="also measure item tables of these sizes, e.g. 10000,100000,1000000")
@click.option("--catalogue-backends", default="ort-cpu", show_default=True)
@click.option("--catalogue-batch", default=256, show_default=True)
@click.option("--out", "out_dir", default="benchmarks/results", show_default=True, type=click.Path(file_okay=False))
@click.option("--name", default="bench", show_default=True, help="file name stem of the results")
@friendly_errors
def bench_main(model, backends, batch_sizes, items, k, threads, min_seconds, catalogue_sizes, catalogue_backends,
               catalogue_batch, out_dir, name):
    """Latency percentiles and throughput per backend and batch size, against the floor."""
    from .benchmarks.latency import ALL_BACKENDS, bench_table, catalogue_scaling, plot, run_bench, split_backend
    from .benchmarks.record import record

    names = [b.strip() for b in backends.split(",") if b.strip()]
    try:
        unknown = sorted({split_backend(n)[0] for n in names} - set(ALL_BACKENDS))
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    if unknown:
        raise click.BadParameter(f"unknown backends {unknown}; choose from {', '.join(ALL_BACKENDS)}")
    res = run_bench(model, names, _int_list(batch_sizes), items=items, k=k, threads=threads,
                    min_seconds=min_seconds, echo=lambda m: click.echo(m, err=True))
    table = bench_table(res)
    if catalogue_sizes:
        rows = catalogue_scaling(_int_list(catalogue_sizes), [b.strip() for b in catalogue_backends.split(",")],
                                 batch=catalogue_batch, k=k, threads=threads, echo=lambda m: click.echo(m, err=True))
        res["catalogue_scaling"] = rows
        table += "\n\nCatalogue scaling (random weights, exact top-k):\n\n| items | backend | batch | users/s | " \
                 "p50 ms | peak RSS MB | floor users/s |\n|---|---|---|---|---|---|---|\n" + "\n".join(
                     f"| {r['items']:,} | {r['backend']} | {r['batch']} | {r.get('users_per_s', 0):,.0f} | "
                     f"{r.get('p50_ms', float('nan')):.2f} | {r.get('peak_rss_mb', float('nan')):.0f} | "
                     f"{r.get('floor_users_per_s', float('nan')):,.0f} |" for r in rows)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res["plots"] = plot(res, out, name)
    jpath, mpath = record(name, res, table, out, title="cddrec-bench")
    click.echo(table)
    click.echo(f"\nwrote {jpath}, {mpath}" + (f", {', '.join(res['plots'])}" if res["plots"] else ""))
