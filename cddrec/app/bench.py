"""``cddrec-bench``: latency and throughput per backend and batch size, against the hardware's roofline."""

from __future__ import annotations

from pathlib import Path

import click

from cddrec.benchmarks.options import int_list
from cddrec.contract import DEFAULT_K

from .options import (
    CONTEXT,
    POSITIVE,
    Finite,
    echo_err,
    friendly_errors,
    k_option,
    lock_outputs,
    option,
    threads_option,
)


@click.command(context_settings=CONTEXT)
@option("--model", default="random", show_default=True,
        help="model.pt, model.onnx, or 'random' (random weights of the given size)")
@option("--backends", default=None,
        help="comma-separated backends (NAME or NAME:tN for N threads) [default: those this machine can run "
             "that read --model]")
@option("--batch-sizes", default="1,8,64,256,1024", show_default=True, help="comma-separated batch sizes")
@option("--items", default=None, type=POSITIVE, help="catalogue size of the random model [default: the paper's 12,101]")
@k_option(DEFAULT_K)
@threads_option()
@option("--min-seconds", default=1.0, show_default=True, type=Finite(min=0, min_open=True),
        help="timed seconds per backend and batch size")
@option("--catalogue-sizes", default="", help="also measure item tables of these sizes, e.g. 10000,100000,1000000")
@option("--catalogue-backends", default="ort-cpu", show_default=True,
        help="backends measured at each --catalogue-sizes size")
@option("--catalogue-batch", default=256, show_default=True, type=POSITIVE,
        help="batch size of the catalogue measurements")
@option("--output", "-o", "out_dir", default="cddrec-bench", show_default=True, type=click.Path(file_okay=False),
        hidden_aliases=("--out",), help="folder for the JSON, markdown and plots")
@option("--name", default="bench", show_default=True, help="file name stem of the results")
@option("--serve", "serve_url", default=None,
        help="drive a running cddrec-serve at URL instead (with --model GRAPH: also ONNX Runtime alone on it); "
             "URL1,URL2,...: compare servers of one model, interleaved (see --rounds)")
@option("--concurrency", default="1,8,64,256", show_default=True, help="--serve: comma-separated client counts")
@option("--seconds", default=10.0, show_default=True, type=Finite(min=0, min_open=True),
        help="--serve: measured seconds per concurrency")
@option("--serve-routes", default="v2,keys", show_default=True,
        help="--serve: v2 (KServe v2 infer, binary tensors) and/or keys (POST /v1/recommend)")
@option("--rounds", type=POSITIVE, default=None,
        help="--serve URL: every step this many times over, ratios per round and their medians [default: 1]; "
             "URL1,URL2,...: rounds over the servers, each round every step on each server in turn, the "
             "first server rotating [default: the number of servers, so each goes first once]")
@friendly_errors
def main(model, backends, batch_sizes, items, k, threads, min_seconds, catalogue_sizes, catalogue_backends,
         catalogue_batch, out_dir, name, serve_url, concurrency, seconds, serve_routes, rounds):
    """Latency percentiles and throughput per backend and batch size, against the roofline; or, with
    --serve URL, requests/s and latency of a running cddrec-serve per concurrency (several URLs: servers
    compared in interleaved rounds)."""
    lock_outputs(out_dir, option="--output", make_folder=True)  # refused before any timing, not after
    if rounds is not None and not serve_url:
        raise click.UsageError("--rounds repeats the load steps: give --serve URL (or URL1,URL2,...)")
    if serve_url:
        bench_servers(serve_url, concurrency, seconds, serve_routes, None if model == "random" else model, threads,
                      out_dir, name, rounds)
        return
    from cddrec.benchmarks.latency import (
        GRAPH_VARIANTS,
        bench_table,
        catalogue_scaling,
        default_backends,
        plot,
        run_bench,
        split_backend,
    )
    from cddrec.benchmarks.record import record
    from cddrec.benchmarks.sizes import PAPER_ITEMS
    from cddrec.runtime.backends import available_backends

    names = [b.strip() for b in (backends or ",".join(default_backends(model))).split(",") if b.strip()]
    known = set(available_backends()) | set(GRAPH_VARIANTS)
    try:
        unknown = sorted({split_backend(n)[0] for n in names} - known)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    if unknown:
        raise click.BadParameter(f"unknown backends {unknown}; choose from {', '.join(sorted(known))}")
    res = run_bench(model, names, int_list(batch_sizes), items=items or PAPER_ITEMS, k=k, threads=threads,
                    min_seconds=min_seconds, echo=echo_err)
    table = bench_table(res)
    if catalogue_sizes:
        rows = catalogue_scaling(int_list(catalogue_sizes), [b.strip() for b in catalogue_backends.split(",")],
                                 batch=catalogue_batch, k=k, threads=threads, echo=echo_err)
        res["catalogue_scaling"] = rows
        table += "\n\n" + catalogue_table(rows)
    out = Path(out_dir)
    res["plots"] = plot(res, out, name)
    jpath, mpath = record(name, res, table, out, title="cddrec-bench")
    click.echo(table)
    click.echo(f"\nwrote {jpath}, {mpath}" + (f", {', '.join(res['plots'])}" if res["plots"] else ""))


def bench_servers(serve_url, concurrency, seconds, serve_routes, model, threads, out_dir, name, rounds) -> None:
    """``--serve``: the URLs checked first (a usage error, exit 2: an empty item, a server given twice, no
    http(s) URL); SIGINT and SIGTERM stop the run at once, one line, exit 130/143."""
    from cddrec.benchmarks.serve_load import bench_serve, server_urls

    try:
        urls = server_urls(serve_url)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--serve") from None
    try:
        table, paths = bench_serve(urls, int_list(concurrency), seconds,
                                   [r.strip() for r in serve_routes.split(",") if r.strip()], model, threads, out_dir,
                                   name, echo=echo_err, rounds=rounds)
    except SystemExit as e:
        if e.code == 143:  # SIGTERM (cddrec.io's handler): said in one line, as an interrupt is
            echo_err("terminated")
        raise
    click.echo(table)
    click.echo(f"\nwrote {', '.join(paths)}")


def catalogue_table(rows: list[dict]) -> str:
    from cddrec.benchmarks.record import cell

    return ("Catalogue scaling (random weights, exact top-k):\n\n| items | backend | batch | users/s | p50 ms | "
            "peak RSS MB | roofline users/s (best case) |\n|---|---|---|---|---|---|---|\n" + "\n".join(
                f"| {r['items']:,} | {r['backend']} | {r['batch']} | {cell(r.get('users_per_s'), ',.0f')} | "
                f"{cell(r.get('p50_ms'), '.2f')} | {cell(r.get('peak_rss_mb'), '.0f')} | "
                f"{cell(r.get('roofline_users_per_s'), ',.0f')} |" for r in rows))


if __name__ == "__main__":
    main()
