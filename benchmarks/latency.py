"""``cddrec-bench``: latency and throughput per backend and batch size, against each backend's roofline.

Each backend runs in its own spawned process, so its load time and peak memory are its own.
Per batch size: warm-up runs, then timed runs until both ``min_runs`` and ``min_seconds`` are
reached; p50/p90/p99 latency and throughput (users/s). Inputs are full-length random histories
(the worst case), drawn from a pool made before timing. CUDA backends return host arrays, so
every timed call includes device synchronization.

Backends: ``torch`` (the plain eager reference: Python loop over T steps, every position
decoded, keys/values projected each step: the baseline), ``torch-fast`` (eager, hoisted,
last position only), ``torch-compile`` (``torch.compile`` of the unrolled graph module),
``ort-cpu``, ``ort-cuda``, ``ort-cuda-graph`` (captured CUDA graphs per batch bucket),
``torch-cuda`` / ``torch-cuda-fp16`` (CUDA-graph replay of the unrolled module), ``trt``.
By default, those this machine can run that read the given file (``default_backends``).

The roofline (``roofline.py``): the best case, users/s = measured matmul peak / FLOPs per user
of what the graph computes (encoder, key/value projections, T single-position decoder steps,
scoring), on the backend's device, at its graph's precision (from its contract) and with its
thread count. A ceiling, not a floor.

Torch-free for a graph (``--model m.onnx``) on ONNX Runtime backends: a serving machine
benchmarks itself. ``--model random`` and a model.pt need PyTorch.

Letters: d hidden, L length, T steps, V item rows, H heads.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import queue
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from cddrec.contract import DEFAULT_K
from cddrec.errors import BackendUnavailable
from cddrec.io import atomic_path

from .record import cell
from .roofline import GraphPrecision, cpu_int8_features, matmul_peak, precision_of, roofline_for
from .sizes import PAPER_ITEMS, random_model
from .timer import Timing, time_calls

# ORT CPU on other graphs of the same model: the fused graph (export --optimize), the int8 graph (export --int8)
GRAPH_VARIANTS = {"ort-cpu-fused": {"optimize": True}, "ort-cpu-int8": {"int8": True},
                  "ort-cpu-fused-int8": {"optimize": True, "int8": True},
                  "ort-cpu-rescore": {"rescore": 100}}  # two-stage top-k: int8 candidates, 100 rescored
TORCH_HINT = "pip install 'cddrec[train]'; a graph (--model m.onnx) benchmarks on ONNX Runtime without it"


def split_backend(name: str) -> tuple[str, int]:
    """``NAME`` or ``NAME:tN`` (N intra-op threads for this backend, e.g. ``ort-cpu:t1``) -> (NAME, N or 0)."""
    base, _, opt = name.partition(":")
    if opt and not (opt[:1] == "t" and opt[1:].isdigit() and int(opt[1:]) > 0):
        raise ValueError(f"backend option {opt!r} in {name!r}: expected tN, N threads (e.g. {base}:t1)")
    return base, int(opt[1:]) if opt else 0


def default_backends(model: str) -> list[str]:
    """The backends this machine can run (``runnable_backends``) that read ``model``: for a graph
    (``.onnx``), the built-in ones that read graphs (entry-point backends are not loaded: loading the
    torch ones would import torch; name a third-party graph backend with --backends); for a model file
    or ``random``, all of them."""
    from cddrec.runtime.backends import backend_class, runnable_backends

    if model.endswith(".onnx"):
        return [n for n in runnable_backends(builtin_only=True) if backend_class(n).reads == "graph"]
    return runnable_backends()


def require_torch(what: str) -> None:
    """A one-line ``BackendUnavailable`` when PyTorch is missing and ``what`` needs it."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise BackendUnavailable(f"{what} needs PyTorch ({TORCH_HINT})") from None


# ------------------------------------------------------------------------- backends
def make_backend(name: str, model_pt: str | None, graph: str | None, engine: str | None, k: int, threads: int):
    """A backend by name (``cddrec.runtime.backends``), on the file it reads."""
    from cddrec.runtime.backends import backend_class, load_backend

    label = name
    name, own_threads = split_backend(name)
    threads = own_threads or threads
    t0 = time.perf_counter()
    if name in GRAPH_VARIANTS:  # another graph of the same model (``graph`` is that graph), on ONNX Runtime CPU
        if graph is None:
            raise BackendUnavailable(f"{name} needs the model file (model.pt) to export its graph")
        name = "ort-cpu"
    reads = backend_class(name).reads
    if reads == "model" and not model_pt:
        raise BackendUnavailable(f"{name} needs the model file (model.pt), not only a graph")
    if reads == "engine" and not engine:
        raise BackendUnavailable(f"{name} needs an engine: install TensorRT (pip install tensorrt)")
    if reads == "model":
        import torch

        if threads:
            torch.set_num_threads(threads)
    path = {"model": model_pt, "engine": engine, "graph": graph}[reads]
    be = load_backend(path, name, k=k, threads=threads)
    be.load_seconds = time.perf_counter() - t0
    be.name = label
    return be


def status_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process in MB. VmHWM starts afresh at exec, unlike
    ru_maxrss, which a spawned child inherits from the parent it was forked from."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if field == "VmHWM" else float("nan")


def time_backend(be, inputs: list[np.ndarray], warmup: int, min_runs: int, min_seconds: float) -> Timing:
    """Time ``be.infer`` cycling through a pool of (B, L) inputs made before timing."""
    return time_calls(lambda i: be.infer({"item_ids": inputs[i % len(inputs)]}), inputs[0].shape[0], warmup=warmup,
                      min_runs=min_runs, min_seconds=min_seconds)


def served_precision(be) -> tuple[str, GraphPrecision]:
    """(device, precision) of what a loaded backend serves: the device it runs on and its graph's
    precision from its contract (``roofline.precision_of``), TF32 from its own option."""
    device = str(getattr(be, "device", None) or type(be).device)
    device = "cuda" if device.startswith("cuda") else device
    tf32 = getattr(be, "tf32", False) or getattr(be, "session_kwargs", {}).get("tf32", False)  # torch / ONNX Runtime
    return device, precision_of(be.contract, device, tf32=bool(tf32))


def _worker(q, name, model_pt, graph, engine, k, threads, batch_sizes, L, V, warmup, min_runs, min_seconds, seed):
    try:
        base = status_mb("VmRSS")
        be = make_backend(name, model_pt, graph, engine, k, threads)
        device, precision = served_precision(be)
        rng = np.random.default_rng(seed)
        rows = []
        for b in batch_sizes:
            pool = [rng.integers(1, V - 1, size=(b, L)).astype(np.int64) for _ in range(4)]
            rows.append(time_backend(be, pool, warmup, min_runs, min_seconds).as_dict())
        peak = status_mb("VmHWM")
        q.put({"backend": name, "device": device, "precisions": precision.parts(), "load_seconds": be.load_seconds,
               "rss_before_mb": base, "peak_rss_mb": peak, "timings": rows})
    except Exception as e:  # noqa: BLE001 - reported, the other backends go on
        q.put({"backend": name, "error": f"{type(e).__name__}: {e}"})


def run_isolated(name: str, **kwargs) -> dict:
    """Benchmark one backend in a fresh spawned process."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_worker, args=(q, name), kwargs=kwargs)
    p.start()
    try:
        res = q.get(timeout=kwargs.get("min_seconds", 1) * 200 + 900)
    except queue.Empty:
        res = {"backend": name, "error": "no result (crashed or timed out)"}
    p.join(timeout=30)
    if p.is_alive():
        p.kill()
    return res


# ---------------------------------------------------------------------------- the run
def steps_run(model_pt: str | None, graph: str | None) -> int | None:
    """S, the reverse steps a graph given alone runs (its contract: an early-exit graph runs fewer than
    T); None (all T) when the graph is exported here from a model file."""
    if model_pt or not graph:
        return None
    from cddrec.runtime.recommender import read_serving_info

    return read_serving_info(graph).contract.steps_run or None


def model_config(model_pt: str | None, graph: str | None):
    """The model's own config: from the model file, or the one every export stores in its metadata."""
    from cddrec.config import ModelConfig

    if model_pt:
        from cddrec.checkpoint import read_checkpoint

        return ModelConfig.from_dict(read_checkpoint(model_pt)["model_config"])
    from cddrec.errors import ModelFileError
    from cddrec.runtime.recommender import read_serving_info

    config = read_serving_info(graph).contract.extra.get("config")  # a ModelFileError for a missing or bad graph
    if config is None:
        raise ModelFileError(f"{graph}: its metadata holds no model config (re-export it with cddrec-export)")
    # pick: the model config of this release's graphs, or the flat config of an earlier release's
    return ModelConfig.pick(json.loads(config) if isinstance(config, str) else config)


def _reads(name: str) -> str | None:
    """What backend ``name`` opens (``reads`` of its class: graph, engine, model); None when unknown here."""
    from cddrec.runtime.backends import backend_class

    try:
        return backend_class(name).reads
    except (ValueError, BackendUnavailable):
        return None


def export_graphs(model_pt: str, bases: set[str], batch_sizes: list[int], k: int, tmp: Path, trt_fp16: bool):
    """The graph (and TensorRT engine) of ``model_pt`` and the variant graphs the backends need."""
    from cddrec.export.onnx_export import ExportOptions, TensorRTOptions, export_model

    graph = engine = export_seconds = None
    reads = {_reads(b) for b in bases if b not in GRAPH_VARIANTS}  # what each backend opens (its class says)
    if reads & {"graph", "engine"}:
        t0 = time.perf_counter()
        engine = str(tmp / "model.plan") if "engine" in reads and _has_tensorrt() else None
        trt = TensorRTOptions(engine, fp16=trt_fp16, max_batch=max(batch_sizes),
                              opt_batch=min(256, max(batch_sizes))) if engine else None
        export_model(model_pt, tmp / "model.onnx", ExportOptions(k=k), trt)
        export_seconds = time.perf_counter() - t0
        graph = str(tmp / "model.onnx")
    graphs, variants = {}, {}
    for variant in sorted(bases & set(GRAPH_VARIANTS)):  # the same model, exported and validated as that graph
        path = tmp / f"model-{variant}.onnx"
        report = export_model(model_pt, path, ExportOptions(k=k, **GRAPH_VARIANTS[variant]))
        graphs[variant] = str(path)
        variants[variant] = {"ops": sum(report.ops_optimized.values()), "ops_standard": sum(report.ops.values()),
                             "max_abs_diff": report.max_abs_diff, "topk_overlap": report.topk_overlap,
                             "topk_mismatches": report.topk_mismatches, "int8": report.int8}
    return graph, engine, export_seconds, graphs, variants


def run_bench(model: str, backends: list[str], batch_sizes: list[int], *, items: int = PAPER_ITEMS, k: int = DEFAULT_K,
              threads: int = 0, warmup: int = 3, min_runs: int = 10, min_seconds: float = 1.0,
              workdir: str | Path | None = None, trt_fp16: bool = False, echo=print) -> dict:
    """Benchmark ``backends`` on ``model`` ("random", a model.pt or a model.onnx), each against its roofline.

    Torch-free for a graph on backends that read graphs."""
    from cddrec.flops import flops_by_operand, flops_per_user

    tmp = Path(workdir or tempfile.mkdtemp(prefix="cddrec-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    model_pt = graph = engine = export_seconds = None
    graphs, variants = {}, {}
    if model.endswith(".onnx"):
        graph = model
    else:
        require_torch("--model random" if model == "random" else f"--model {model} (a model file)")
        model_pt = str(random_model(tmp / "random.pt", items)) if model == "random" else model
        graph, engine, export_seconds, graphs, variants = export_graphs(
            model_pt, {split_backend(b)[0] for b in backends}, batch_sizes, k, tmp, trt_fp16)
    cfg, S = model_config(model_pt, graph), steps_run(model_pt, graph)  # S: an early-exit graph's steps
    d, L, V, T, layers = cfg.hidden_size, cfg.max_len, cfg.num_rows, cfg.decoder_steps, cfg.num_layers
    threads = threads or (os.cpu_count() or 1)
    fl, fl_plain = flops_per_user(cfg, steps=S), flops_per_user(cfg, plain=True, steps=S)
    by_operand = flops_by_operand(cfg, steps=S)
    peak_seconds = min(1.0, max(min_seconds, 0.2))
    echo(f"measuring the fp32 matmul peak on {threads} threads ...")
    cpu_fp32 = matmul_peak("cpu", "fp32", threads, seconds=peak_seconds)
    results = []
    for name in backends:
        echo(f"benchmarking {name} ...")
        base_name, own_threads = split_backend(name)
        variant_graph = graphs.get(base_name) if base_name in GRAPH_VARIANTS else graph
        r = run_isolated(name, model_pt=model_pt, graph=variant_graph, engine=engine, k=k, threads=threads,
                         batch_sizes=batch_sizes, L=L, V=V, warmup=warmup, min_runs=min_runs,
                         min_seconds=min_seconds, seed=0)
        if "error" in r:
            echo(f"  {name}: skipped ({r['error']})")
        else:  # against its own hardware's peak, at its graph's precision, with its threads
            roof = roofline_for(by_operand, GraphPrecision(**r.pop("precisions")), r.pop("device"),
                                own_threads or threads, seconds=peak_seconds)
            r["roofline"], r["_peaks"] = roof.as_dict(), list(roof.peaks.values())
            for t in r["timings"]:
                t["share_of_roofline"] = t["users_per_s"] / roof.users_per_s if roof.users_per_s else None
        results.append(r)
    base = {t["batch"]: t["users_per_s"] for r in results if r["backend"] == "torch" and "timings" in r
            for t in r["timings"]}
    for r in results:
        for t in r.get("timings", []):
            if t["batch"] in base:
                t["speedup_vs_torch"] = t["users_per_s"] / base[t["batch"]]
    peaks = {(p.device, p.precision, p.threads): p for p in [cpu_fp32] + [
        p for r in results for p in r.pop("_peaks", [])]}
    return {"config": {"d": d, "L": L, "T": T, "S": S or T, "items": V - 2, "k": k, "layers": layers, "threads": threads,
                       "cuda": any(r.get("roofline", {}).get("device") == "cuda" for r in results)},
            "roofline_definition": "best-case users/s = measured matmul peak / FLOPs per user (a ceiling, not a floor)",
            "cpu_fp32_peak_gflops": cpu_fp32.gflops, "roofline_users_per_s": cpu_fp32.gflops * 1e9 / fl["total"],
            "peaks": [p.as_dict() for _, p in sorted(peaks.items())], "cpu_int8": cpu_int8_features(),
            "flops_per_user": fl, "flops_per_user_by_operand": by_operand, "flops_per_user_plain_reference": fl_plain,
            "export_seconds": export_seconds, "graph_variants": variants, "results": results}


def _has_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def roofline_lines(res: dict) -> list[str]:
    """One line per distinct roofline of the run: device, precision, threads, peaks, users/s."""
    seen: dict[tuple, tuple[dict, list[str]]] = {}
    for r in res["results"]:
        f = r.get("roofline")
        if f:
            key = (f["device"], f["precision"], f["threads"])
            seen.setdefault(key, (f, []))[1].append(r["backend"])
    lines = []
    for (device, _, threads), (f, names) in seen.items():
        peaks = ", ".join(f"{p} {g:,.0f}" for p, g in f["peaks_gflops"].items())
        where = f"{device}, {threads} thread{'s' if threads > 1 else ''}" if device == "cpu" else device
        best = f"{f['users_per_s']:,.0f} users/s" if f["users_per_s"] else f"not measured ({f.get('unavailable')})"
        detail = GraphPrecision(**f["precisions"]).detail
        lines.append(f"- {where}, {detail}: matmul peak {peaks} GFLOP/s -> roofline {best} ({', '.join(names)})")
    return lines


def bench_table(res: dict) -> str:
    rows = ["| backend | precision | batch | p50 ms | p90 ms | p99 ms | users/s | x torch | share of roofline | load s "
            "| peak RSS MB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["results"]:
        if "error" in r:
            rows.append(f"| {r['backend']} | - | - | - | - | - | - | - | - | - | skipped: {r['error'][:80]} |")
            continue
        for t in r["timings"]:
            rows.append(f"| {r['backend']} | {r['roofline']['precision']} | {t['batch']} | {t['p50_ms']:.3f} | "
                        f"{t['p90_ms']:.3f} | {t['p99_ms']:.3f} | {t['users_per_s']:,.0f} | "
                        f"{cell(t.get('speedup_vs_torch'), '.2f')} | {cell(t.get('share_of_roofline'), '.2f')} | "
                        f"{r['load_seconds']:.2f} | {r['peak_rss_mb']:.0f} |")
    c = res["config"]
    fl = res["flops_per_user"]
    vnni = res.get("cpu_int8", {}).get("vnni")
    exit_note = f" (early exit: the graph runs S={c['S']})" if c.get("S", c["T"]) != c["T"] else ""
    rows += ["", f"Model: d={c['d']}, L={c['L']}, T={c['T']}{exit_note}, {c['items']:,} items, k={c['k']}, "
             f"{c['threads']} threads. "
             f"FLOPs/user (graph): {fl['total'] / 1e6:.2f} M (encoder {fl['encoder'] / 1e6:.2f}, decoder K/V "
             f"{fl['decoder_kv'] / 1e6:.2f}, {c.get('S', c['T'])} steps {fl['decoder_steps'] / 1e6:.2f}, scoring "
             f"{fl['scoring'] / 1e6:.2f}); plain reference {res['flops_per_user_plain_reference']['total'] / 1e6:.2f} M.",
             "", "Roofline: the best case, users/s = measured matmul peak / FLOPs per user, on the backend's device, "
             "at its graph's precision (from the graph's contract; a mixed graph sums FLOPs / peak over its parts) "
             "and with its threads. A ceiling, not a floor: a share above 1 means the peak measurement fell short "
             f"of the backend's own kernels. CPU int8 dot products (VNNI): {'-' if vnni is None else vnni}.", ""]
    rows += roofline_lines(res)
    for name, v in res.get("graph_variants", {}).items():
        parity = ", ".join(f"batch {b}: {d:.1e}" for b, d in v["max_abs_diff"].items())
        overlap = ", ".join(f"{o:.3f}" for o in v["topk_overlap"].values())
        rows.append(f"\n{name}: graph of {v['ops']} ops (standard {v['ops_standard']}); vs the PyTorch reference "
                    f"max |score diff| {parity}" + (f"; top-{c['k']} overlap {overlap}" if overlap else "")
                    + f"; top-k mismatches beyond ties {v['topk_mismatches']}.")
    return "\n".join(rows)


def plot(res: dict, out_dir: Path, name: str) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    rooflines = {}
    for r in res["results"]:
        f = r.get("roofline")
        if f and f["users_per_s"]:
            rooflines[(f["device"], f["precision"], f["threads"])] = f["users_per_s"]
    paths = []
    for metric, label, fname in (("p50_ms", "p50 latency (ms)", "latency"), ("users_per_s", "throughput (users/s)",
                                                                           "throughput")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in res["results"]:
            if "timings" not in r:
                continue
            xs = [t["batch"] for t in r["timings"]]
            ax.plot(xs, [t[metric] for t in r["timings"]], marker="o", label=r["backend"])
        if metric == "users_per_s":
            for i, ((device, precision, threads), users) in enumerate(sorted(rooflines.items())):
                where = f"{device} {threads}t" if device == "cpu" else device
                ax.axhline(users, color="k", ls=("--", ":", "-.")[i % 3], lw=1,
                           label=f"roofline {where} {precision} (best case)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel(label)
        c = res["config"]
        ax.set_title(f"cddrec d={c['d']} L={c['L']} T={c['T']} items={c['items']:,}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        p = out_dir / f"{name}_{fname}.png"
        with atomic_path(p) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        paths.append(str(p))
    return paths


def catalogue_scaling(sizes: list[int], backends: list[str], batch: int = 256, k: int = 10, threads: int = 0,
                      min_seconds: float = 2.0, workdir: str | Path | None = None, echo=print) -> list[dict]:
    """users/s and peak memory for item tables of each size (random weights, exact top-k), with the
    backend's roofline at that size."""
    tmp = Path(workdir or tempfile.mkdtemp(prefix="cddrec-scale-"))
    out = []
    for n in sizes:
        echo(f"catalogue of {n:,} items ...")
        res = run_bench("random", backends, [batch], items=n, k=k, threads=threads, min_seconds=min_seconds,
                        workdir=tmp / f"items{n}", echo=lambda m: None)
        for r in res["results"]:
            row = {"items": n, "backend": r["backend"], "batch": batch}
            if "error" in r:
                row["error"] = r["error"]
            else:
                t = r["timings"][0]
                row.update(users_per_s=t["users_per_s"], p50_ms=t["p50_ms"], peak_rss_mb=r["peak_rss_mb"],
                           rss_before_mb=r["rss_before_mb"], roofline_users_per_s=r["roofline"]["users_per_s"])
            out.append(row)
            echo(f"  {row}")
    return out
