"""``cddrec-bench``: latency and throughput per backend and batch size, against the physical floor.

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

The floor: FLOPs per user of what the graph computes (encoder, key/value projections, T
single-position decoder steps, scoring) against the machine's measured fp32 matmul peak.

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

from .gpu_floor import floor_for, gpu_matmul_peak
from .sizes import PAPER_ITEMS, random_model
from .timer import Timing, time_calls

# ORT CPU on other graphs of the same model: the fused graph (export --optimize), the int8 graph (export --int8)
GRAPH_VARIANTS = {"ort-cpu-fused": {"optimize": True}, "ort-cpu-int8": {"int8": True},
                  "ort-cpu-fused-int8": {"optimize": True, "int8": True},
                  "ort-cpu-rescore": {"rescore": 100}}  # two-stage top-k: int8 candidates, 100 rescored


def split_backend(name: str) -> tuple[str, int]:
    """``NAME`` or ``NAME:tN`` (N intra-op threads for this backend, e.g. ``ort-cpu:t1``) -> (NAME, N or 0)."""
    base, _, opt = name.partition(":")
    if opt and not (opt[:1] == "t" and opt[1:].isdigit() and int(opt[1:]) > 0):
        raise ValueError(f"backend option {opt!r} in {name!r}: expected tN, N threads (e.g. {base}:t1)")
    return base, int(opt[1:]) if opt else 0


# ---------------------------------------------------------------------------- the floor
def matmul_peak(threads: int = 0, n: int = 2048, seconds: float = 1.0) -> float:
    """Measured fp32 matmul GFLOP/s on the CPU (n x n by n x n)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    runs, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or runs < 3:
        a @ b
        runs += 1
    return 2 * n**3 * runs / (time.perf_counter() - t0) / 1e9


# ------------------------------------------------------------------------- backends
def make_backend(name: str, model_pt: str | None, graph: str | None, engine: str | None, k: int, threads: int):
    """A backend by name (``cddrec.runtime.backends``), on the file it reads."""
    from cddrec.runtime.backends import backend_class, load_backend

    label = name
    name, own_threads = split_backend(name)
    threads = own_threads or threads
    t0 = time.perf_counter()
    if name in GRAPH_VARIANTS:  # another graph of the same model (``graph`` is that graph), on ONNX Runtime CPU
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


def _worker(q, name, model_pt, graph, engine, k, threads, batch_sizes, L, V, warmup, min_runs, min_seconds, seed):
    try:
        import torch  # noqa: F401

        base = status_mb("VmRSS")
        be = make_backend(name, model_pt, graph, engine, k, threads)
        rng = np.random.default_rng(seed)
        rows = []
        for b in batch_sizes:
            pool = [rng.integers(1, V - 1, size=(b, L)).astype(np.int64) for _ in range(4)]
            rows.append(time_backend(be, pool, warmup, min_runs, min_seconds).as_dict())
        peak = status_mb("VmHWM")
        q.put({"backend": name, "load_seconds": be.load_seconds, "rss_before_mb": base, "peak_rss_mb": peak,
               "timings": rows})
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
def run_bench(model: str, backends: list[str], batch_sizes: list[int], *, items: int = PAPER_ITEMS, k: int = DEFAULT_K,
              threads: int = 0, warmup: int = 3, min_runs: int = 10, min_seconds: float = 1.0,
              workdir: str | Path | None = None, trt_fp16: bool = False, echo=print) -> dict:
    """Benchmark ``backends`` on ``model`` ("random", a model.pt or a model.onnx)."""
    import torch

    from cddrec.checkpoint import read_checkpoint
    from cddrec.config import ModelConfig
    from cddrec.export.onnx_export import export_model
    from cddrec.model import flops_per_user
    from cddrec.runtime.session import graph_metadata

    tmp = Path(workdir or tempfile.mkdtemp(prefix="cddrec-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    model_pt = graph = engine = None
    if model == "random":
        model_pt = str(random_model(tmp / "random.pt", items))
    elif model.endswith(".onnx"):
        graph = model
    else:
        model_pt = model
    # the model's own config: from the model file, or the one every export stores in its metadata
    cfg = ModelConfig.pick(read_checkpoint(model_pt)["model_config"] if model_pt else
                           json.loads(graph_metadata(graph)["config"]))  # pick: also an earlier release's flat config
    d, L, V, T, layers = cfg.hidden_size, cfg.max_len, cfg.num_rows, cfg.decoder_steps, cfg.num_layers
    bases = {split_backend(b)[0] for b in backends}
    needs_graph = bool(bases & {"ort-cpu", "ort-cuda", "ort-cuda-graph", "trt"})
    export_seconds = None
    if needs_graph and graph is None:
        t0 = time.perf_counter()
        trt_path = str(tmp / "model.plan") if "trt" in backends and _has_tensorrt() else None
        export_model(model_pt, tmp / "model.onnx", k=k, trt_engine=trt_path, trt_fp16=trt_fp16,
                     trt_max_batch=max(batch_sizes), trt_opt_batch=min(256, max(batch_sizes)))
        export_seconds = time.perf_counter() - t0
        graph, engine = str(tmp / "model.onnx"), trt_path
    graphs, variants = {}, {}
    for variant in sorted(bases & set(GRAPH_VARIANTS)):
        if model_pt:  # the same model, exported and validated as that graph
            path = tmp / f"model-{variant}.onnx"
            report = export_model(model_pt, path, k=k, **GRAPH_VARIANTS[variant])
            graphs[variant] = str(path)
            variants[variant] = {"ops": sum(report.ops_optimized.values()), "ops_standard": sum(report.ops.values()),
                                 "max_abs_diff": report.max_abs_diff, "topk_overlap": report.topk_overlap,
                                 "topk_mismatches": report.topk_mismatches, "int8": report.int8}
    threads = threads or (os.cpu_count() or 1)
    echo(f"measuring the fp32 matmul peak on {threads} threads ...")
    peak = matmul_peak(threads)
    fl = flops_per_user(cfg)
    fl_plain = flops_per_user(cfg, plain=True)
    floor = peak * 1e9 / fl["total"]  # the CPU's
    results = []
    for name in backends:
        echo(f"benchmarking {name} ...")
        r = run_isolated(name, model_pt=model_pt, graph=graphs.get(split_backend(name)[0], graph), engine=engine,
                         k=k, threads=threads,
                         batch_sizes=batch_sizes, L=L, V=V, warmup=warmup, min_runs=min_runs,
                         min_seconds=min_seconds, seed=0)
        if "error" in r:
            echo(f"  {name}: skipped ({r['error']})")
        else:  # each backend against its own hardware's floor: the GPU's peak at the backend's precision
            base_name = split_backend(name)[0]
            f = floor_for("ort-cpu" if base_name in GRAPH_VARIANTS else base_name, cpu_peak=lambda: peak,
                          gpu_peak=gpu_matmul_peak, fp16=base_name.endswith("fp16"))
            r["floor"] = {"device": f.device, "precision": f.precision, "matmul_peak_gflops": f.gflops,
                          "users_per_s": f.users_per_s(fl["total"])}
            for t in r["timings"]:
                t["share_of_floor"] = t["users_per_s"] / r["floor"]["users_per_s"]
        results.append(r)
    base = {t["batch"]: t["users_per_s"] for r in results if r["backend"] == "torch" and "timings" in r
            for t in r["timings"]}
    for r in results:
        for t in r.get("timings", []):
            if t["batch"] in base:
                t["speedup_vs_torch"] = t["users_per_s"] / base[t["batch"]]
    return {"config": {"d": d, "L": L, "T": T, "items": V - 2, "k": k, "layers": layers, "threads": threads,
                       "cuda": torch.cuda.is_available()},
            "matmul_peak_gflops": peak, "flops_per_user": fl, "flops_per_user_plain_reference": fl_plain,
            "floor_users_per_s": floor, "export_seconds": export_seconds, "graph_variants": variants,
            "results": results}


def _has_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def bench_table(res: dict) -> str:
    rows = ["| backend | batch | p50 ms | p90 ms | p99 ms | users/s | x torch | share of floor | load s | peak RSS MB |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["results"]:
        if "error" in r:
            rows.append(f"| {r['backend']} | - | - | - | - | - | - | - | - | skipped: {r['error'][:80]} |")
            continue
        for t in r["timings"]:
            rows.append(f"| {r['backend']} | {t['batch']} | {t['p50_ms']:.3f} | {t['p90_ms']:.3f} | {t['p99_ms']:.3f} | "
                        f"{t['users_per_s']:,.0f} | {_ratio(t.get('speedup_vs_torch'))} | "
                        f"{t['share_of_floor']:.2f} | {r['load_seconds']:.2f} | {r['peak_rss_mb']:.0f} |")
    c = res["config"]
    fl = res["flops_per_user"]
    rows += ["", f"Model: d={c['d']}, L={c['L']}, T={c['T']}, {c['items']:,} items, k={c['k']}, {c['threads']} threads. "
             f"FLOPs/user (graph): {fl['total'] / 1e6:.2f} M (encoder {fl['encoder'] / 1e6:.2f}, decoder K/V "
             f"{fl['decoder_kv'] / 1e6:.2f}, {c['T']} steps {fl['decoder_steps'] / 1e6:.2f}, scoring "
             f"{fl['scoring'] / 1e6:.2f}); plain reference {res['flops_per_user_plain_reference']['total'] / 1e6:.2f} M. "
             f"Matmul peak {res['matmul_peak_gflops']:.0f} GFLOP/s -> floor {res['floor_users_per_s']:,.0f} users/s."]
    gpu = {r["backend"]: r["floor"] for r in res["results"] if r.get("floor", {}).get("device") == "cuda"}
    if gpu:
        rows.append("GPU backends against the GPU's own floor: " + "; ".join(
            f"{n}: {f['precision']} peak {f['matmul_peak_gflops']:,.0f} GFLOP/s -> {f['users_per_s']:,.0f} users/s"
            for n, f in gpu.items()) + ".")
    for name, v in res.get("graph_variants", {}).items():
        parity = ", ".join(f"batch {b}: {d:.1e}" for b, d in v["max_abs_diff"].items())
        overlap = ", ".join(f"{o:.3f}" for o in v["topk_overlap"].values())
        rows.append(f"{name}: graph of {v['ops']} ops (standard {v['ops_standard']}); vs the PyTorch reference "
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
            ax.axhline(res["floor_users_per_s"], color="k", ls="--", lw=1, label="floor (matmul peak)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel(label)
        c = res["config"]
        ax.set_title(f"cddrec d={c['d']} L={c['L']} T={c['T']} items={c['items']:,}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = out_dir / f"{name}_{fname}.png"
        with atomic_path(p) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        paths.append(str(p))
    return paths


def catalogue_scaling(sizes: list[int], backends: list[str], batch: int = 256, k: int = 10, threads: int = 0,
                      min_seconds: float = 2.0, workdir: str | Path | None = None, echo=print) -> list[dict]:
    """users/s and peak memory for item tables of each size (random weights, exact top-k)."""
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
                           rss_before_mb=r["rss_before_mb"], floor_users_per_s=res["floor_users_per_s"])
            out.append(row)
            echo(f"  {row}")
    return out
