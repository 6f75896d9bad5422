"""Command-line entry points. They parse options and call library functions, nothing more."""

from __future__ import annotations

import functools
import sys
from dataclasses import asdict, fields
from pathlib import Path

import click

from cddrec.benchmarks.sizes import PAPER_ITEMS
from cddrec.config import CDDRecConfig, click_type, default_of, preset_for, read_config_file
from cddrec.contract import APPROX_MIN_OVERLAP, DEFAULT_K, DEFAULT_OPSET, DYNAMO_MIN_OPSET, MIN_OPSET
from cddrec.errors import CDDRecError
from cddrec.io import install_signal_cleanup, json_dumps, refuse_overwrite_inputs
from cddrec.metrics import TOPK
from cddrec.runtime.backends import BUILTIN as BACKEND_NAMES

SKIP_FIELDS = {"num_items", "extra"}
# lower bounds of config flags whose field has no ``min`` metadata yet (the field's metadata wins)
POSITIVE = click.IntRange(min=1)


TRAIN_MODULES = ("torch", "onnx", "onnxscript")  # what the [train] extra brings


def friendly_errors(fn):
    """Turn expected errors (bad data, bad model files, bad settings, unwritable outputs) into one-line
    messages (exit 1), and SIGINT/SIGTERM into exit 130/143 after removing temporary files
    (the exit codes are listed in README.md)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        install_signal_cleanup()
        try:
            return fn(*args, **kwargs)
        except (CDDRecError, ValueError) as e:
            raise click.ClickException(str(e)) from e
        except ModuleNotFoundError as e:  # a serving-only install has no torch/onnx: say what to install
            if (e.name or "").split(".")[0] not in TRAIN_MODULES:
                raise
            raise click.ClickException(f"this command needs {e.name.split('.')[0]}, which a serving-only install "
                                       "lacks: pip install 'cddrec[train]' (cddrec-infer serves graphs without "
                                       "it)") from e
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            raise click.ClickException(f"{where}{e.strerror or e}") from e
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


def config_options(fn):
    """One option per config field (``hidden_size`` -> ``--hidden-size``), default: unset.

    Types, ranges and choices come from the field declarations (``cddrec.config.click_type``),
    the same declarations ``CDDRecConfig`` checks file values against."""
    for f in reversed(fields(CDDRecConfig)):
        if f.name in SKIP_FIELDS:
            continue
        flag = f.name.replace("_", "-")
        help_ = f.metadata.get("help", "") + f" [default: {default_of(f)}]"
        if isinstance(default_of(f), bool):
            fn = click.option(f"--{flag}/--no-{flag}", f.name, default=None, help=help_)(fn)
        else:
            fn = click.option(f"--{flag}", f.name, type=click_type(f.name), default=None, help=help_)(fn)
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
@click.option("--quiet", is_flag=True, help="no progress bar or progress lines")
@click.option("--progress-every", default=30.0, show_default=True, type=click.FloatRange(0, min_open=True),
              help="seconds between progress lines when stderr is not a terminal (logs, CI, nohup)")
@click.option("--summary-json", type=click.Path(dir_okay=False), help="write the training summary here")
@data_options
@config_options
@friendly_errors
def train_main(data, out, config_file, preset, resume, quiet, progress_every, summary_json, user_col, item_col,
               time_col, sep, **overrides):
    """Train CDDRec on DATA (`user item item ...` lines, or a CSV/TSV/Parquet log)."""
    from cddrec.data import load_data
    from cddrec.io import atomic_write_json
    from cddrec.training import train

    refuse_overwrite_inputs({"--out": out, "--summary-json": summary_json, "resume file": f"{out}.resume.pt"},
                            {"DATA": data, "--config": config_file})
    cfg = build_config(data, config_file, preset, overrides)
    explicit_kcore = overrides.get("kcore") is not None or (config_file and "kcore" in read_config_file(config_file))
    ds = load_data(data, kcore=cfg.kcore if explicit_kcore else None, **_data_kwargs(user_col, item_col, time_col, sep))
    f = ds.filtered
    click.echo(f"{data}: " + (f"k-core {f['kcore']} removed {f['users_removed']} users, {f['items_removed']} items, "
                              f"{f['interactions_removed']} interactions" if f["kcore"] > 1 else
                              "no k-core filter (a sequence file; --kcore N to filter)")
               + f"; {f['users_under_3_items']} users with fewer than 3 items skipped; {len(ds.users)} users, "
               f"{ds.num_items} items, {ds.num_interactions} interactions", err=True)
    tty = sys.stderr.isatty()
    summary = train(cfg, ds, out, resume=resume, progress=not quiet and tty,
                    progress_every=0.0 if quiet or tty else progress_every, log=lambda m: click.echo(m, err=True))
    click.echo(f"wrote {out}: best epoch {summary['best_epoch']}, valid "
               + " ".join(f"{k} {summary['best_valid'].get(k, float('nan')):.4f}" for k in ("R@10", "N@10", "MRR")))
    if summary_json:
        atomic_write_json(summary_json, {"model": str(out), "config": asdict(cfg.replace(num_items=ds.num_items)),
                                         **summary})


# ------------------------------------------------------------------------------ eval
@click.command(context_settings={"max_content_width": 110})
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("data", type=click.Path(dir_okay=False))
@click.option("--split", type=click.Choice(["test", "valid"]), default="test", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
@click.option("--save-topk", type=click.Path(dir_okay=False), help="write JSONL top-k lists here")
@click.option("--topk", default=TOPK, show_default=True, type=click.IntRange(min=1),
              help="list length for --save-topk (shorter where fewer items are rankable)")
@click.option("--stages", is_flag=True, help="also rank with every intermediate denoising state")
@click.option("--batch-size", default=512, show_default=True, type=click.IntRange(min=1))
@click.option("--device", default="cpu", show_default=True)
@data_options
@friendly_errors
def eval_main(model, data, split, as_json, save_topk, topk, stages, batch_size, device, user_col, item_col,
              time_col, sep):
    """Evaluate MODEL on DATA: leave-one-out, full ranking, seen items excluded."""
    from cddrec.checkpoint import load_checkpoint
    from cddrec.evaluation import evaluate_file, format_table, write_topk
    from cddrec.training import resolve_device
    from cddrec.vocab import Vocab

    refuse_overwrite_inputs({"--save-topk": save_topk}, {"MODEL": model, "DATA": data})
    net, ckpt = load_checkpoint(model)
    net.to(resolve_device(device))
    vocab = Vocab.from_dict(ckpt["vocab"])
    res = evaluate_file(net, vocab, data, split, read_options=_data_kwargs(user_col, item_col, time_col, sep),
                        batch_size=batch_size, stages=stages, keep_topk=topk if save_topk else 0,
                        progress=sys.stderr.isatty())
    if ckpt.get("data", {}).get("fingerprint") not in (None, res.fingerprint):
        click.echo(f"warning: {data} differs from the data {model} was trained on (after its filters)", err=True)
    rep = res.report
    click.echo(f"{data}: evaluated {rep['users_evaluated']} of {rep['users_in_file']} users (no filter); "
               f"skipped {rep['users_under_3_items']} with fewer than 3 items; dropped "
               f"{rep['unknown_history_items_dropped']} history items unknown to the model; "
               f"{rep['unknown_targets_counted_as_misses']} targets unknown to the model counted as misses",
               err=True)
    out = {"dataset": Path(data).stem, "split": split, "model": str(model), **res.metrics, "data": rep}
    if stages:
        out["stages"] = res.stages
    if save_topk:
        n = write_topk(save_topk, res.user_keys, res, vocab)
        click.echo(f"wrote {n} top-{topk} lists to {save_topk} (cut where the rankable items end)", err=True)
    if as_json:
        click.echo(json_dumps(out, indent=2))
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
@click.option("--minutes", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="training time budget")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--force", is_flag=True, help="replace an earlier demo run in the folder")
@friendly_errors
def demo_main(out_dir, minutes, seed, force):
    """Train and evaluate on a seeded synthetic dataset with planted sequential structure."""
    from .demo import run_demo

    run_demo(out_dir, minutes=minutes, seed=seed, echo=click.echo, force=force)


# ---------------------------------------------------------------------------- export
@click.command(context_settings={"max_content_width": 110})
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--out", "-o", type=click.Path(dir_okay=False), help="graph file [default: MODEL with .onnx]")
@click.option("--k", default=DEFAULT_K, show_default=True, type=POSITIVE, help="top-k items the graph returns")
@click.option("--opset", default=DEFAULT_OPSET, show_default=True, type=click.IntRange(min=MIN_OPSET),
              help=f"ONNX opset (>= {MIN_OPSET}; the dynamo exporter writes >= {DYNAMO_MIN_OPSET})")
@click.option("--fp16", is_flag=True, help="fp16 matmuls; LayerNorm, softmax, scoring and TopK stay fp32")
@click.option("--stochastic", is_flag=True, help="add a noise input (T, batch, d): the sampled reverse chain")
@click.option("--optimize", is_flag=True,
              help="the fused graph: ONNX Runtime contrib ops (attention, BiasGelu); ONNX Runtime only, not --trt")
@click.option("--int8", is_flag=True,
              help="int8 MatMuls (dynamic quantization; with --optimize, of the fused graph), validated by top-k overlap")
@click.option("--int8-scoring", is_flag=True, help="with --int8: the scoring MatMul in int8 too")
@click.option("--rescore", default=0, show_default=True, type=click.IntRange(min=0),
              help="two-stage top-k for large catalogues: int8 scores pick this many candidates, rescored in fp32")
@click.option("--exporter", type=click.Choice(["torchscript", "dynamo"]), default="torchscript", show_default=True)
@click.option("--vocab-sidecar/--vocab-inline", default=None,
              help="item vocabulary in MODEL.vocab.json beside the graph, or in its metadata "
                   "[default: inline up to 200k items]")
@click.option("--trt", "trt_engine", type=click.Path(dir_okay=False), help="also build a TensorRT engine here")
@click.option("--trt-fp16", is_flag=True, help="fp16 TensorRT engine (needs --fp16: the engine's precision is the graph's)")
@click.option("--trt-max-batch", default=1024, show_default=True, type=POSITIVE)
@click.option("--trt-opt-batch", default=256, show_default=True, type=POSITIVE)
@click.option("--triton-repo", type=click.Path(file_okay=False),
              help="also write a Triton model repository here: NAME/config.pbtxt, NAME/1/model.onnx, NAME/vocab.json")
@click.option("--triton-name", default="cddrec", show_default=True, help="model name in the Triton repository")
@click.option("--triton-cpu", is_flag=True, help="Triton instance group of kind CPU [default: GPU]")
@click.option("--triton-max-batch", default=1024, show_default=True, type=click.IntRange(min=0),
              help="Triton max_batch_size (0: no batching)")
@click.option("--triton-trt/--triton-no-trt", default=True, show_default=True,
              help="the onnxruntime backend's TensorRT accelerator on GPU (FP16 with --fp16 or --trt-fp16)")
@click.option("--triton-cuda-graphs", is_flag=True,
              help="CUDA graphs through the TensorRT accelerator (trt_cuda_graph_enable)")
@click.option("--no-validate", is_flag=True, help="skip validation (not recommended)")
@click.option("--json", "as_json", is_flag=True, help="print the export report as JSON")
@friendly_errors
def export_main(model, out, k, opset, fp16, stochastic, optimize, int8, int8_scoring, rescore, exporter, vocab_sidecar,
                trt_engine, trt_fp16, trt_max_batch, trt_opt_batch, triton_repo, triton_name, triton_cpu,
                triton_max_batch, triton_trt, triton_cuda_graphs, no_validate, as_json):
    """Export MODEL (model.pt) to one ONNX graph: encoder, T unrolled denoising steps, scoring,
    seen-item masking and top-k; validated against PyTorch before it is kept."""
    from cddrec.export.onnx_export import export_model

    if Path(model).suffix.lower() == ".onnx":
        raise click.UsageError(f"{model} is an exported graph; cddrec-export takes the model file cddrec-train "
                               "wrote (model.pt)")
    if int8_scoring and not int8:
        raise click.UsageError("--int8-scoring quantizes the scoring MatMul of an --int8 graph: add --int8")
    out = out or str(Path(model).with_suffix(".onnx"))
    refuse_overwrite_inputs({"--out": out, "--trt": trt_engine,
                             "vocabulary file": Path(out).with_suffix(".vocab.json") if vocab_sidecar else None},
                            {"MODEL": model})
    if triton_repo and optimize and triton_trt and not triton_cpu:
        raise click.UsageError("--triton-repo with the TensorRT accelerator needs a standard-op graph: drop --optimize "
                               "(or add --triton-cpu or --triton-no-trt)")
    if triton_repo and triton_cuda_graphs and (triton_cpu or not triton_trt):
        raise click.UsageError("--triton-cuda-graphs works through the TensorRT accelerator on GPU: "
                               "not with --triton-cpu or --triton-no-trt")
    rep = export_model(model, out, k=k, opset=opset, fp16=fp16, stochastic=stochastic, optimize=optimize,
                       exporter=exporter, vocab_sidecar=vocab_sidecar, trt_engine=trt_engine, trt_fp16=trt_fp16,
                       trt_max_batch=trt_max_batch, trt_opt_batch=trt_opt_batch, validate=not no_validate,
                       int8=int8, int8_scoring=int8_scoring, rescore=rescore)
    if triton_repo:
        from cddrec.export.triton import write_triton_repo

        repo = write_triton_repo(out, triton_repo, triton_name, gpu=not triton_cpu, max_batch=triton_max_batch,
                                 tensorrt=triton_trt, precision="FP16" if fp16 or trt_fp16 else "FP32",
                                 cuda_graphs=triton_cuda_graphs, opt_batch=trt_opt_batch)
        rep.triton_repo = str(repo.model_dir)
    if rep.k_requested:
        click.echo(f"note: --k {rep.k_requested} exceeds the {rep.contract['num_items']} items of the catalogue; "
                   f"the graph returns K={rep.contract['k']}", err=True)
    if as_json:
        click.echo(json_dumps(asdict(rep), indent=2))
        return
    click.echo(f"wrote {rep.path} ({rep.graph_bytes / 1e6:.2f} MB, {sum(rep.ops.values())} ops"
               + (f" -> {sum(rep.ops_optimized.values())} after optimization" if rep.ops_optimized else "") + ")")
    if rep.max_abs_diff:
        diffs = ", ".join(f"batch {b}: {v:.2e}" for b, v in rep.max_abs_diff.items())
        verdict = ("top-k positions that differ from the reference beyond ties (an approximate graph, judged by "
                   "overlap): " if rep.topk_overlap else "top-k mismatches beyond ties: ")
        click.echo(f"validated against PyTorch: max |score diff| {diffs}; {verdict}{rep.topk_mismatches}; "
                   f"ORT session {rep.session_seconds * 1000:.0f} ms")
    if rep.topk_overlap:
        click.echo("approximate graph: top-k overlap with the fp32 reference " + ", ".join(
            f"batch {b}: {v:.3f}" for b, v in rep.topk_overlap.items()) + f" (declared minimum {APPROX_MIN_OVERLAP})")
    if rep.vocab_sidecar:
        click.echo(f"wrote {rep.vocab_sidecar}")
    if rep.trt_engine:
        click.echo(f"wrote TensorRT engine {rep.trt_engine}")
    if triton_repo:
        click.echo(f"wrote Triton model repository {repo.model_dir} (config.pbtxt, 1/model.onnx, vocab.json)")


# ----------------------------------------------------------------------------- infer
@click.command(context_settings={"max_content_width": 110})
@click.option("--model", "model_path", required=True, type=click.Path(dir_okay=False),
              help="exported graph (.onnx), TensorRT engine (with --backend trt) or model.pt (--backend torch)")
@click.option("--batch", "input_path", required=True, type=click.Path(),
              help="requests: JSONL {\"user\": key, \"history\": [item keys]}, Parquet requests or a "
                   "CSV/TSV/Parquet log; with --ray, a file, directory or glob of JSONL/Parquet shards")
@click.option("--output", "-o", required=True, type=click.Path(),
              help="recommendations file; with --ray, a directory (one output per shard)")
@click.option("--k", type=POSITIVE, default=None, help="items per user [default: the graph's K]")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="users per engine call")
@click.option("--backend", type=click.Choice(list(BACKEND_NAMES)), default="ort-cpu", show_default=True)
@click.option("--threads", default=0, show_default=True, type=click.IntRange(min=0),
              help="CPU threads (0 = all cores)")
@click.option("--tf32", is_flag=True, help="ort-cuda/ort-cuda-graph: allow TF32 matmuls (faster, not fp32 parity)")
@click.option("--strict", is_flag=True, help="stop at the first bad line, exit non-zero, write no output")
@click.option("--output-format", type=click.Choice(["jsonl", "csv", "parquet"]), default=None,
              help="[default: from the output suffix: .csv, .parquet/.pq, else jsonl]")
@click.option("--input-format", type=click.Choice(["jsonl", "parquet", "log"]), default=None,
              help="[default: log for .csv/.tsv and Parquet without a list column 'history', "
                   "parquet (requests) for Parquet with one, else jsonl]")
@click.option("--allow-duplicates", is_flag=True, help="do not check for repeated users (saves memory)")
@click.option("--quiet", is_flag=True, help="no progress bar")
@click.option("--ray", "ray_address", default=None,
              help="serve shards on Ray Data: 'local' (start Ray here), 'auto' or a cluster address")
@click.option("--ray-actors", type=click.IntRange(min=1), default=None,
              help="actors, each with one model [default: one per CPU, at most one per shard]")
@click.option("--ray-gpus", type=click.FloatRange(min=0), default=None,
              help="GPUs per actor [default: 1 for the CUDA backends, else 0]")
@data_options
@friendly_errors
def infer_main(model_path, input_path, output, k, batch_size, backend, threads, tf32, strict, output_format,
               input_format, allow_duplicates, quiet, ray_address, ray_actors, ray_gpus, user_col, item_col, time_col,
               sep):
    """Batched top-k recommendations for a file of user histories, original item keys in and out."""
    from cddrec.runtime.batch import run_batch
    from cddrec.runtime.pipeline import engine_options
    from cddrec.runtime.recommender import Recommender

    if tf32 and backend not in ("ort-cuda", "ort-cuda-graph"):
        raise click.BadParameter(f"--tf32 applies to ort-cuda and ort-cuda-graph, not {backend}", param_hint="--tf32")
    if ray_address:
        import time

        if input_format == "log" or (user_col, item_col, time_col, sep) != ("user", "item", "timestamp", None):
            raise click.UsageError("--ray serves request shards (JSONL or Parquet requests); interaction logs and "
                                   "--user-col/--item-col/--time-col/--sep are for a single file without --ray")

        from cddrec.runtime.distributed import run_sharded

        t0 = time.perf_counter()
        stats, rows = run_sharded(model_path, input_path, output, ray_address=ray_address, actors=ray_actors,
                                  backend=backend, threads=threads or 1, gpus_per_actor=ray_gpus,
                                  out_fmt=output_format, k=k, batch_size=batch_size, strict=strict,
                                  check_duplicates=not allow_duplicates, tf32=tf32)
        stats.seconds = time.perf_counter() - t0
        click.echo(stats.summary() + f", shards {len(rows)}", err=True)
        bad = [r["errors"] for r in rows if r["errors"]]
        click.echo(f"wrote {len(rows)} outputs to {output}" + (f"; bad lines in {len(bad)} errors files" if bad
                                                                else ""), err=True)
        if stats.bad and not stats.served:
            sys.exit(3)
        return

    rec = Recommender.load(model_path, backend=backend, threads=threads, k=k, **engine_options(backend, tf32))
    stats = run_batch(rec, input_path, output, k=k, batch_size=batch_size, strict=strict,
                      output_format=output_format, in_format=input_format, check_duplicates=not allow_duplicates,
                      progress=not quiet and sys.stderr.isatty(),
                      log_options=_data_kwargs(user_col, item_col, time_col, sep))
    click.echo(stats.summary(), err=True)
    click.echo(f"wrote {output}" + (f"; bad lines in {stats.errors_path}" if stats.errors_path else ""), err=True)
    if stats.bad and not stats.served:
        sys.exit(3)  # finished, but every line was bad


# ----------------------------------------------------------------------------- bench
def _int_list(s: str) -> list[int]:
    try:
        values = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {s!r}") from None
    if not values or min(values) < 1:
        raise click.BadParameter(f"expected comma-separated integers >= 1, got {s!r}")
    return values


@click.command(context_settings={"max_content_width": 110})
@click.option("--model", default="random", show_default=True,
              help="model.pt, model.onnx, or 'random' (random weights of the given size)")
@click.option("--backends", default=",".join(BACKEND_NAMES), show_default=True)
@click.option("--batch-sizes", default="1,8,64,256,1024", show_default=True)
@click.option("--items", default=PAPER_ITEMS, show_default=True, type=POSITIVE, help="catalogue size of the random model")
@click.option("--k", default=DEFAULT_K, show_default=True, type=POSITIVE)
@click.option("--threads", default=0, show_default=True, type=click.IntRange(min=0), help="CPU threads (0 = all cores)")
@click.option("--min-seconds", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="timed seconds per backend and batch size")
@click.option("--catalogue-sizes", default="", help="also measure item tables of these sizes, e.g. 10000,100000,1000000")
@click.option("--catalogue-backends", default="ort-cpu", show_default=True)
@click.option("--catalogue-batch", default=256, show_default=True, type=POSITIVE)
@click.option("--out", "out_dir", default="benchmarks/results", show_default=True, type=click.Path(file_okay=False))
@click.option("--name", default="bench", show_default=True, help="file name stem of the results")
@friendly_errors
def bench_main(model, backends, batch_sizes, items, k, threads, min_seconds, catalogue_sizes, catalogue_backends,
               catalogue_batch, out_dir, name):
    """Latency percentiles and throughput per backend and batch size, against the floor."""
    from cddrec.benchmarks.latency import GRAPH_VARIANTS, bench_table, catalogue_scaling, plot, run_bench, split_backend
    from cddrec.benchmarks.record import record
    from cddrec.runtime.backends import available_backends

    names = [b.strip() for b in backends.split(",") if b.strip()]
    known = set(available_backends()) | set(GRAPH_VARIANTS)
    try:
        unknown = sorted({split_backend(n)[0] for n in names} - known)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    if unknown:
        raise click.BadParameter(f"unknown backends {unknown}; choose from {', '.join(sorted(known))}")
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
