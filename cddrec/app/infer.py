"""``cddrec-infer``: top-k recommendations for a file of histories (or many shards on Ray), keys in and out."""

from __future__ import annotations

import sys

import click

from cddrec.runtime.backends import available_backends, backend_class, engine_options, tf32_backends, tf32_problem

from .options import (
    CONTEXT,
    EXIT_NOTHING_SERVED,
    EXIT_PROBLEMS,
    Finite,
    data_kwargs,
    data_options,
    echo_err,
    friendly_errors,
    k_option,
    option,
    progress_every_option,
    threads_option,
)


@click.command(context_settings=CONTEXT)
@option("--model", "model_path", required=True, type=click.Path(dir_okay=False),
        help="exported graph (.onnx), TensorRT engine (with --backend trt) or model.pt (--backend torch)")
@option("--batch", "input_path", required=True, type=click.Path(),
        help="requests: JSONL {\"user\": key, \"history\": [item keys]}, Parquet requests or a "
             "CSV/TSV/Parquet log; with --ray, a file, directory or glob of JSONL/Parquet shards")
@option("--output", "-o", required=True, type=click.Path(), hidden_aliases=("--out",),
        help="recommendations file; '-' (stdout), a FIFO or a device is written straight through; "
             "with --ray, a directory (one output per shard)")
@option("--errors", "errors_path", type=click.Path(dir_okay=False), default=None,
        help="bad lines as JSONL [default: OUTPUT.errors.jsonl; for '-', a FIFO or a device: "
             "./cddrec-infer.errors.jsonl]")
@option("--keys", type=click.Choice(["auto", "str", "int"]), default="auto", show_default=True,
        help="type of the keys written: auto (items as the model's vocabulary: integers when every key is "
             "an integer; users as given), str (all strings) or int (all integers)")
@k_option(None, "items per user [default: the graph's K]")
@option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True, help="users per engine call")
@option("--backend", type=click.Choice(sorted(available_backends())), default="ort-cpu", show_default=True,
        help="engine that runs the graph (torch backends read model.pt and need the [train] extra)")
@threads_option(help_="CPU threads of each engine instance (0: the cores divided among the instances)")
@option("--instances", type=click.IntRange(0, 256), default=0,
        help="engine batches run side by side on this many threads, sharing one loaded model [default: 0, the "
             "backend's choice: ort-cpu one single-thread instance per core (or the cores divided by --threads); "
             "the other backends run one batch at a time and refuse more than 1]")
@option("--tf32", is_flag=True, help=f"{'/'.join(tf32_backends())}: allow TF32 matmuls (faster, not fp32 parity)")
@option("--strict", is_flag=True, help="stop at the first bad line, exit non-zero, write no output")
@option("--output-format", type=click.Choice(["jsonl", "csv", "parquet"]), default=None,
        help="[default: from the output suffix: .csv, .parquet/.pq, else jsonl]")
@option("--input-format", type=click.Choice(["jsonl", "parquet", "log"]), default=None,
        help="[default: log for .csv/.tsv and Parquet without a list column 'history', "
             "parquet (requests) for Parquet with one, else jsonl]")
@option("--allow-duplicates", is_flag=True, help="do not check for repeated users (saves memory)")
@option("--quiet", is_flag=True, help="no progress bar or progress lines")
@progress_every_option()
@option("--verbose", is_flag=True, help="show Ray's own logging (with --ray)")
@option("--ray", "ray_address", default=None,
        help="serve shards on Ray Data: 'local' (start Ray here), 'auto' or a cluster address")
@option("--ray-actors", type=click.IntRange(min=1), default=None,
        help="actors, each with one model [default: one per CPU, at most one per shard]")
@option("--ray-gpus", type=Finite(min=0), default=None,
        help="GPUs per actor [default: 1 for the CUDA backends, else 0]")
@data_options
@friendly_errors
def main(model_path, input_path, output, errors_path, keys, k, batch_size, backend, threads, instances, tf32, strict,
         output_format, input_format, allow_duplicates, quiet, progress_every, verbose, ray_address, ray_actors,
         ray_gpus, user_col, item_col, time_col, sep):
    """Batched top-k recommendations for a file of user histories, original item keys in and out."""
    from cddrec.runtime.pipeline import run_batch
    from cddrec.runtime.recommender import Recommender

    if tf32 and tf32_problem(backend):
        raise click.BadParameter("--" + tf32_problem(backend), param_hint="--tf32")
    if ray_address:
        if input_format == "log" or (user_col, item_col, time_col, sep) != ("user", "item", "timestamp", None):
            raise click.UsageError("--ray serves request shards (JSONL or Parquet requests); interaction logs and "
                                   "--user-col/--item-col/--time-col/--sep are for a single file without --ray")
        if errors_path:
            raise click.UsageError("--errors names one file; with --ray each shard has its own errors file in the "
                                   "output folder")
        from cddrec.runtime.distributed import run_sharded, summary_lines

        stats, rows = run_sharded(model_path, input_path, output, ray_address=ray_address, actors=ray_actors,
                                  backend=backend, threads=threads or 1, gpus_per_actor=ray_gpus,
                                  out_fmt=output_format, k=k, batch_size=batch_size, strict=strict,
                                  check_duplicates=not allow_duplicates, tf32=tf32, keys=keys, verbose=verbose)
        for line in summary_lines(stats, rows, output):
            echo_err(line)
        _exit(stats, failed=sum(bool(r["error"]) for r in rows))
        return

    try:
        instances, threads = backend_class(backend).serving_instances(threads, instances)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--instances") from None
    rec = Recommender.load(model_path, backend=backend, threads=threads, k=k, instances=instances,
                           **engine_options(backend, tf32))
    stats = run_batch(rec, input_path, output, k=k, batch_size=batch_size, strict=strict,
                      output_format=output_format, in_format=input_format, check_duplicates=not allow_duplicates,
                      progress=not quiet and sys.stderr.isatty(),
                      progress_every=0.0 if quiet or sys.stderr.isatty() else progress_every, log=echo_err,
                      keys=keys, errors_path=errors_path,
                      log_options=data_kwargs(user_col, item_col, time_col, sep))
    echo_err(rec.startup_line() + "; " + stats.summary())  # after the run: a refused output stays one line
    echo_err(f"wrote {'stdout' if output == '-' else output}"
             + (f"; bad lines in {stats.errors_path}" if stats.errors_path else ""))
    _exit(stats)


def _exit(stats, failed: int = 0) -> None:
    """The exit-code table (cddrec.app.options): nothing served -> 3, served with problems -> 4."""
    if (stats.bad or failed) and not stats.served:
        sys.exit(EXIT_NOTHING_SERVED)  # finished, but every line (or shard) was bad
    if stats.mostly_fallback or failed:
        sys.exit(EXIT_PROBLEMS)


if __name__ == "__main__":
    main()
