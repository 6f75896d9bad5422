"""The GPU check (run by ``gpu_check.sh``): parity and speed of the CUDA serving backends on the
paper-size random model, ``cddrec-infer`` end to end, and ``cddrec-serve`` under load.

    python -m cddrec.benchmarks.gpu_bench --out $OUT [--device cuda] [--requests 1000000] [--budget-seconds 330]

1. export: the fp32, the fp16 and the early-exit graph (``--steps S``, ``--exit-steps``) with
   ``export_model`` (validation runs ort-cuda too when CUDA is present: ``parity_cuda``);
2. parity: every serving variant (ort-cuda, TF32 ort-cuda, ort-cuda-graph, torch-cuda,
   torch-cuda-fp16, the fp16 graph on ort-cuda and ort-cuda-graph, the early-exit graph on both)
   against the plain fp32 PyTorch reference (CPU; of S steps for the early-exit graph) on fresh
   random histories, through the one parity loop (``cddrec.parity.compare_runners``: max score
   difference, top-10 overlap, mismatches beyond ties) under the graph's contract rule
   (``contract.parity_rule(device)``); TF32 is reported against the same rule, as opt-in serving;
3. speed: ``cddrec-bench``'s ``run_bench`` (one spawned process per backend) at batch 1, 4096 and
   16384: torch-cuda and torch-cuda-fp16 on the model file, ort-cuda and ort-cuda-graph on the fp32
   and the early-exit graph, ort-cuda-graph on the fp16 graph, each against its roofline
   (``benchmarks/roofline.py``; an early-exit graph's FLOPs count its S steps);
4. ``cddrec-infer`` (the command itself, in a subprocess) on generated JSONL requests, and the same
   requests as Parquet (in and out) on the first backend;
5. ``cddrec-serve`` on ort-cuda-graph and ort-cuda under load (``cddrec-bench --serve``), when the command exists.

Every phase checks the time left (``--budget-seconds``) and is skipped, with a note, rather than
cut off; the report is written after each phase. Targets (issue 21): batch-1 p50 <= 0.3 ms (best
backend), >= 2,000,000 users/s at batch >= 4096 (fp16 allowed, parity stated), cddrec-infer >=
400,000 users/s. ``--device cpu`` runs the same code on CPU backends (the dry run of
``gpu_check.sh --dry-run``). Writes ``NAME.json`` and ``NAME.md`` (NAME: gpu_check_<device>).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import shutil
import subprocess
import tempfile
import time
import traceback
from pathlib import Path

import click
import numpy as np

from .options import int_list
from .record import cell, record, user_command
from .sizes import PAPER_ITEMS, random_model

TARGETS = {"batch1_p50_ms": 0.3, "users_per_s_at_4096": 2_000_000, "infer_users_per_s": 400_000}
# seconds a phase needs at least (measured on the development CPU at paper size, with margin for an H200 host)
PHASE_SECONDS = {"parity": 40, "bench": 30, "infer": 40, "serve": 40}


@dataclasses.dataclass
class Files:
    """The files every phase reads: the model, its fp32, fp16 and early-exit (S steps) graphs."""

    model_pt: str
    graph: str
    graph16: str
    graph_s: str
    exit_steps: int


def variants(device: str, f: Files) -> dict[str, tuple[str, str, dict, int | None]]:
    """name -> (backend, file, options, steps of its reference: None for all T) on ``device``."""
    S = f.exit_steps
    if device == "cpu":  # the dry run: the same code paths on CPU backends
        return {"ort-cpu": ("ort-cpu", f.graph, {}, None),
                "ort-cpu-buckets": ("ort-cpu", f.graph, {"buckets": (1, 64, 256)}, None),
                "ort-cpu-fp16-graph": ("ort-cpu", f.graph16, {}, None), "torch-fast": ("torch-fast", f.model_pt, {}, None),
                f"ort-cpu-early-exit-S{S}": ("ort-cpu", f.graph_s, {}, S)}
    return {"ort-cuda": ("ort-cuda", f.graph, {}, None), "ort-cuda-tf32": ("ort-cuda", f.graph, {"tf32": True}, None),
            "ort-cuda-graph": ("ort-cuda-graph", f.graph, {}, None),
            "ort-cuda-fp16-graph": ("ort-cuda", f.graph16, {}, None),
            "ort-cuda-graph-fp16-graph": ("ort-cuda-graph", f.graph16, {}, None),
            "torch-cuda": ("torch-cuda", f.model_pt, {}, None), "torch-cuda-fp16": ("torch-cuda-fp16", f.model_pt, {}, None),
            f"ort-cuda-early-exit-S{S}": ("ort-cuda", f.graph_s, {}, S),
            f"ort-cuda-graph-early-exit-S{S}": ("ort-cuda-graph", f.graph_s, {}, S)}


def histories(rng, batch: int, length: int, items: int) -> np.ndarray:
    """(batch, length) left-padded random histories of random lengths >= 1."""
    lens = rng.integers(1, length + 1, size=batch)
    ids = rng.integers(1, items + 1, size=(batch, length)).astype(np.int64)
    ids[np.arange(length)[None, :] < (length - lens)[:, None]] = 0
    return ids


def check_parity(model, contract, device: str, files: Files, batches: list[int], seed: int = 7) -> dict:
    """Every variant against the fp32 reference on fresh random histories (the same feeds for all; one
    reference per number of steps), through the one parity loop (``compare_runners``), each under its
    contract's rule on ``device`` (``parity_rule``: the fp16 variants are judged as fp16 graphs). Each
    feed runs twice: the first call captures where there is a graph to capture."""
    import torch

    from cddrec.inference import reference_runner
    from cddrec.parity import compare_runners
    from cddrec.runtime.backends import load_backend

    rng = np.random.default_rng(seed)
    feeds = {str(b): {"item_ids": histories(rng, b, contract.max_len, contract.num_items)} for b in batches}
    refs: dict = {}  # steps -> {label: (B, V) fp32 scores}
    out = {}
    for name, (backend, path, options, steps) in variants(device, files).items():
        if steps not in refs:
            with torch.no_grad():
                reference = reference_runner(model, steps=steps)
                refs[steps] = {label: reference(feed) for label, feed in feeds.items()}
        try:
            be = load_backend(path, backend, k=contract.k, warmup=True, **options)
        except Exception as e:  # noqa: BLE001 - recorded, the other variants go on
            out[name] = {"error": "".join(traceback.format_exception_only(type(e), e)).strip()[-600:]}
            continue
        rule = be.contract.parity_rule(device)  # the served graph's own rule (fp16, S steps, tolerance)
        parity = compare_runners({name: be.infer}, refs[steps], feeds, runs=2, keep_going=True, **rule)
        be.close()
        if parity.errors:
            out[name] = {"error": parity.errors[name]}
            continue
        out[name] = {"backend": backend, "file": Path(path).name, "steps": steps or contract.steps,
                     "options": {k_: list(v) if isinstance(v, tuple) else v for k_, v in options.items()},
                     "declared": {"rtol": rule["rtol"], "atol": rule["atol"]}, "exact_ids": rule["exact_ids"],
                     "tf32": bool(options.get("tf32")), "ok": parity.ok,
                     "batches": {b: p.as_dict() for b, p in parity.results[name].items()}}
    return out


def write_requests(path: Path, n: int, items: int, seed: int = 0, max_len: int = 30) -> None:
    """``n`` JSONL requests {"user", "history"} with keys of the random model's vocabulary ("0".."N-1"),
    1..``max_len`` items each (those longer than L=20 take the uncaptured path of the graph backends)."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for start in range(0, n, 100_000):
            m = min(100_000, n - start)
            lens = rng.integers(1, max_len + 1, size=m)
            flat = rng.integers(0, items, size=int(lens.sum()))
            pos = 0
            lines = []
            for i, n_i in enumerate(lens.tolist()):
                hist = ",".join(f'"{x}"' for x in flat[pos:pos + n_i].tolist())
                pos += n_i
                lines.append(f'{{"user": "u{start + i}", "history": [{hist}]}}\n')
            f.write("".join(lines))


def requests_as_parquet(jsonl: Path) -> Path:
    """The JSONL requests as a Parquet file beside them (user: string, history: list of strings)."""
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    out = jsonl.with_suffix(".parquet")
    pq.write_table(pj.read_json(jsonl), out)
    return out


def run_infer(model: str, backend: str, requests: Path, out: Path, batch_size: int, n: int, timeout: float) -> dict:
    """The cddrec-infer command itself, timed from outside (load included)."""
    cmd = [*user_command("cddrec-infer"), "--model", model,
           "--batch", str(requests), "--output", str(out), "--backend", backend, "--batch-size", str(batch_size),
           "--quiet", "--allow-duplicates"]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        rc, err = p.returncode, p.stderr
    except subprocess.TimeoutExpired as e:
        rc, err = "timeout", (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else str(e.stderr)
    secs = time.perf_counter() - t0
    res = {"backend": backend, "format": requests.suffix[1:], "batch_size": batch_size, "requests": n, "rc": rc,
           "seconds": secs,
           "users_per_s_wall": n / secs, "stderr_tail": (err or "").strip().splitlines()[-3:]}
    out.unlink(missing_ok=True)
    return res


# ------------------------------------------------------------------------------ cddrec-serve
def ready_url(log: Path, proc: subprocess.Popen, timeout: float) -> str | None:
    """The URL of ``cddrec-serve --port 0`` once its log says ``ready at URL`` (the port it got: nothing
    can take it in between, as with a port picked here first); None when it exits or ``timeout`` passes."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        m = re.search(r"cddrec-serve: ready at (http://[^\s/]+)", log.read_text(errors="replace"))
        if m:
            return m.group(1)
        time.sleep(0.2)
    return None


def run_serve(graph: str, backend: str, workdir: Path, concurrency: str, seconds: float, timeout: float) -> dict:
    """``cddrec-serve --model GRAPH --backend BACKEND --port 0`` (a port of its own), driven by
    ``cddrec-bench --serve URL`` (both the commands themselves); the load generator's JSON report.
    Skipped when the ``cddrec-serve`` command is not installed."""
    if importlib.util.find_spec("cddrec.app.serve") is None:
        return {"skipped": "the cddrec-serve command is not installed (the online server is not in this build)"}
    serve, bench = user_command("cddrec-serve"), user_command("cddrec-bench")  # both of this install
    log, name = workdir / f"serve_{backend}.log", f"serve_{backend}"
    t0 = time.monotonic()
    with open(log, "w") as err:
        proc = subprocess.Popen([*serve, "--model", graph, "--backend", backend, "--host", "127.0.0.1", "--port", "0"],
                                stdout=err, stderr=subprocess.STDOUT)
        try:
            url = ready_url(log, proc, min(90.0, timeout / 2))
            if url is None:
                return {"error": f"cddrec-serve not ready (rc {proc.poll()})", "log_tail": _tail(log)}
            ready = time.monotonic() - t0
            p = subprocess.run([*bench, "--serve", url, "--concurrency", concurrency, "--seconds", str(seconds),
                                "-o", str(workdir), "--name", name], capture_output=True, text=True,
                               timeout=max(10.0, timeout - ready))
            if p.returncode != 0 or not (workdir / f"{name}.json").exists():
                return {"error": f"cddrec-bench --serve rc {p.returncode}", "stderr_tail": p.stderr.splitlines()[-5:]}
            res = json.loads((workdir / f"{name}.json").read_text())
            return {"backend": backend, "ready_seconds": ready, "results": res.get("results", []),
                    "server_model": res.get("server_model")}
        except subprocess.TimeoutExpired:
            return {"error": "cddrec-bench --serve timed out", "log_tail": _tail(log)}
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def _tail(path: Path, n: int = 8) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


# ------------------------------------------------------------------------------------ report
def table(rep: dict) -> str:
    lines = ["| variant | steps | batch | max score diff | tolerance | top-10 overlap | mismatches | ok |",
             "|---|---|---|---|---|---|---|---|"]
    for name, v in rep.get("parity", {}).items():
        if "error" in v:
            lines.append(f"| {name} | - | - | - | - | - | - | error: {v['error'][:100]} |")
            continue
        for b, p in v["batches"].items():
            lines.append(f"| {name} | {v.get('steps', '-')} | {b} | {p['max_abs_diff']:.2e} | {p['tolerance']:.2e} | "
                         f"{p['overlap']:.4f} | {p['topk_mismatches']} | {p['ok']} |")
    lines += ["", "| backend (file) | batch | p50 ms | p99 ms | users/s | share of roofline |", "|---|---|---|---|---|---|"]
    for label, res in rep.get("bench", {}).items():
        for r in res.get("results", []):
            if "error" in r:
                lines.append(f"| {r['backend']} ({label}) | - | - | - | - | error: {r['error'][:100]} |")
                continue
            for t in r["timings"]:
                lines.append(f"| {r['backend']} ({label}) | {t['batch']} | {t['p50_ms']:.3f} | {t['p99_ms']:.3f} | "
                             f"{t['users_per_s']:,.0f} | {cell(t.get('share_of_roofline'), '.3f')} |")
    for r in rep.get("infer", []):
        lines.append(f"\ncddrec-infer {r['backend']} ({r.get('format', 'jsonl')}) batch {r['batch_size']}: "
                     f"{r['requests']:,} requests in "
                     f"{r['seconds']:.1f} s = {r['users_per_s_wall']:,.0f} users/s (rc {r['rc']})")
    for serve in rep.get("serve", []):
        lines += serve_lines(serve)
    if rep.get("skipped"):
        lines.append("\nSkipped for lack of time: " + ", ".join(rep["skipped"]))
    lines.append("\nTargets: " + json.dumps(rep.get("summary", {})))
    return "\n".join(lines)


def serve_lines(serve: dict) -> list[str]:
    if "results" not in serve:
        return [f"\ncddrec-serve: {serve.get('skipped') or serve.get('error')}"]
    lines = [f"\ncddrec-serve --backend {serve['backend']} (ready in {serve['ready_seconds']:.1f} s), "
             "cddrec-bench --serve:", "", "| route | concurrency | requests/s | p50 ms | p99 ms | mean server batch | "
             "errors |", "|---|---|---|---|---|---|---|"]
    for r in serve["results"]:
        errors = sum((r.get("errors") or {}).values())
        lines.append(f"| {r.get('route')} | {r.get('concurrency')} | {cell(r.get('requests_per_s'), ',.0f')} | "
                     f"{cell(r.get('p50_ms'), '.2f')} | {cell(r.get('p99_ms'), '.2f')} | "
                     f"{cell(r.get('mean_batch'), '.1f')} | {errors} |")
    return lines


def summarize(rep: dict) -> dict:
    """The three targets against the best measured figure (with the variant that gave it)."""
    best1, best_big = (None, float("inf")), (None, 0.0)
    for label, res in rep.get("bench", {}).items():
        for r in res.get("results", []):
            for t in r.get("timings", []):
                tag = f"{r['backend']} ({label})"
                if t["batch"] == 1 and t["p50_ms"] < best1[1]:
                    best1 = (tag, t["p50_ms"])
                if t["batch"] >= 4096 and t["users_per_s"] > best_big[1]:
                    best_big = (tag, t["users_per_s"])
    infer = max(rep.get("infer", []), key=lambda r: r["users_per_s_wall"] if r["rc"] == 0 else 0, default=None)
    return {"batch1_p50_ms": {"best": best1[1], "by": best1[0], "target": TARGETS["batch1_p50_ms"]},
            "users_per_s_at_4096_plus": {"best": best_big[1], "by": best_big[0],
                                         "target": TARGETS["users_per_s_at_4096"]},
            "infer_users_per_s": {"best": infer["users_per_s_wall"] if infer else None,
                                  "by": infer["backend"] if infer else None, "target": TARGETS["infer_users_per_s"]}}


# ------------------------------------------------------------------------------------ phases
@dataclasses.dataclass
class Check:
    """One run of the GPU check: its settings, its report (``rep``, recorded after every phase) and its
    clock: every phase first checks that it fits what is left of ``budget_seconds``."""

    out: Path
    device: str
    items: int = PAPER_ITEMS
    hidden: int = 128
    steps: int = 20
    exit_steps: int = 2
    sizes: tuple[int, ...] = (1, 4096, 16384)
    parity_batches: tuple[int, ...] = (1, 4096)
    seconds: float = 1.0
    n_requests: int = 1_000_000
    infer_batch: int = 4096
    serve_concurrency: str = "1,64,256"
    serve_seconds: float = 5.0
    budget_seconds: float = 330.0
    name: str = "gpu_check"
    title: str = "GPU check"
    rep: dict = dataclasses.field(default_factory=lambda: {"errors": {}, "skipped": []})
    start: float = dataclasses.field(default_factory=time.monotonic)

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def left(self) -> float:
        return self.budget_seconds - (time.monotonic() - self.start)

    def save(self) -> None:
        self.rep["summary"] = summarize(self.rep)
        self.rep["seconds"] = round(time.monotonic() - self.start, 1)
        record(self.name, self.rep, table(self.rep), self.out, title=self.title)

    def step(self, label: str) -> None:
        click.echo(f"[{time.strftime('%H:%M:%S')} +{time.monotonic() - self.start:.0f}s] {label}", err=True)

    def fits(self, phase: str) -> bool:
        if self.left() < PHASE_SECONDS[phase]:
            self.rep["skipped"].append(f"{phase} ({self.left():.0f} s left)")
            self.step(f"skipped {phase}: {self.left():.0f} s left of {self.budget_seconds:.0f}")
            return False
        return True

    def run(self, tmp: Path) -> None:
        """The phases in order (export, parity, speed, cddrec-infer, cddrec-serve, more cddrec-infer),
        each skipped when it no longer fits; the report is saved after each."""
        from cddrec.checkpoint import load_checkpoint
        from cddrec.export.onnx_export import contract_for

        self.step("model and graphs")
        files = export_all(tmp, self.items, self.hidden, self.steps, self.exit_steps, self.rep)
        model, _ = load_checkpoint(files.model_pt)
        self.save()
        if self.fits("parity"):
            self.step("parity")
            self.rep["parity"] = check_parity(model, contract_for(model, 10), self.device, files,
                                              list(self.parity_batches))
            self.save()
        if self.fits("bench"):
            self.bench(files, tmp)
        infer = ((("ort-cuda-graph", files.graph), ("torch-cuda", files.model_pt)) if self.cuda else
                 (("ort-cpu", files.graph),))
        req = tmp / "requests.jsonl"
        if self.n_requests and self.fits("infer"):  # the first backend, the server, the others while time is left
            self.step(f"cddrec-infer: writing {self.n_requests:,} requests")
            write_requests(req, self.n_requests, self.items)
            self.rep["infer"] = []
            self.infer(*infer[0], req, tmp)
            if self.fits("infer"):  # the same requests as Parquet in and out: the columnar reader and writer
                self.step("cddrec-infer: the requests as Parquet")
                self.infer(*infer[0], requests_as_parquet(req), tmp)
        self.rep["serve"] = []
        for backend in ("ort-cuda-graph", "ort-cuda") if self.cuda else ("ort-cpu",):
            if self.fits("serve"):
                self.step(f"cddrec-serve --backend {backend} under load")
                self.rep["serve"].append(run_serve(files.graph, backend, tmp, self.serve_concurrency,
                                                   self.serve_seconds, self.left()))
                self.save()
        for backend, path in infer[1:]:
            if "infer" in self.rep and self.fits("infer"):
                self.infer(backend, path, req, tmp)

    def bench(self, files: Files, tmp: Path) -> None:
        """``run_bench`` per file: the model file on the torch backends, each graph on the ONNX Runtime ones."""
        from .latency import run_bench

        ort = ["ort-cuda", "ort-cuda-graph"] if self.cuda else ["ort-cpu"]
        runs = {"model": (files.model_pt, ["torch-cuda", "torch-cuda-fp16"] if self.cuda else ["torch-fast"]),
                "fp32 graph": (files.graph, ort), "fp16 graph": (files.graph16, ort[-1:]),  # its ort-cuda: parity only
                f"early exit S={files.exit_steps} graph": (files.graph_s, ort)}
        self.rep["bench"] = {}
        for label, (path, backends) in runs.items():
            self.step(f"speed: {label} {backends}")
            try:
                self.rep["bench"][label] = run_bench(path, backends, list(self.sizes), items=self.items,
                                                     min_seconds=self.seconds,
                                                     workdir=tmp / label.replace(" ", "_").replace("=", ""),
                                                     echo=lambda m: self.step("  " + m))
            except Exception as e:  # noqa: BLE001 - recorded, the other files go on
                self.rep["errors"][f"bench {label}"] = repr(e)[-600:]
            self.save()

    def infer(self, backend: str, path: str, req: Path, tmp: Path) -> None:
        """cddrec-infer on ``req``, writing the same format (JSONL or Parquet)."""
        self.step(f"cddrec-infer --backend {backend} ({req.suffix[1:]})")
        self.rep["infer"].append(run_infer(path, backend, req, tmp / f"recs{req.suffix}", self.infer_batch,
                                           self.n_requests, self.left()))
        self.save()


def export_all(tmp: Path, items: int, hidden: int, steps: int, exit_steps: int, rep: dict) -> Files:
    """The random model and its three validated graphs; their export reports go to ``rep``."""
    from cddrec.export.onnx_export import ExportOptions, export_model

    model_pt = str(random_model(tmp / "model.pt", items, hidden_size=hidden, steps=steps))
    files = Files(model_pt, str(tmp / "model.onnx"), str(tmp / "model_fp16.onnx"), str(tmp / f"model_S{exit_steps}.onnx"),
                  exit_steps)
    rep["export"] = {}
    for label, path, options in (("fp32", files.graph, ExportOptions(k=10)),
                                 ("fp16", files.graph16, ExportOptions(k=10, fp16=True)),
                                 (f"fp32 S={exit_steps}", files.graph_s, ExportOptions(k=10, steps=exit_steps))):
        r = export_model(model_pt, path, options)
        rep["export"][label] = {"validated_on": r.validated_on, "parity": r.parity, "parity_cuda": r.parity_cuda,
                                "ops": sum(r.ops.values()), "seconds": r.export_seconds}
    return files


@click.command()
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda", show_default=True)
@click.option("--items", default=PAPER_ITEMS, show_default=True)
@click.option("--hidden", default=128, show_default=True)
@click.option("--steps", default=20, show_default=True)
@click.option("--exit-steps", default=2, show_default=True, help="S of the early-exit graph (cddrec-export --steps S)")
@click.option("--batch-sizes", default="1,4096,16384", show_default=True, help="timed batch sizes")
@click.option("--parity-batches", default="1,4096", show_default=True)
@click.option("--seconds", default=1.0, show_default=True, help="timed seconds per backend and batch size")
@click.option("--requests", "n_requests", default=1_000_000, show_default=True, help="cddrec-infer requests")
@click.option("--infer-batch", default=4096, show_default=True)
@click.option("--serve-concurrency", default="1,64,256", show_default=True, help="cddrec-bench --serve clients")
@click.option("--serve-seconds", default=5.0, show_default=True)
@click.option("--budget-seconds", default=330.0, show_default=True,
              help="seconds for the whole run; phases that no longer fit are skipped")
@click.option("--name", default=None, help="result file stem [default: gpu_check_<device name>]")
def main(out_dir, device, items, hidden, steps, exit_steps, batch_sizes, parity_batches, seconds, n_requests,
         infer_batch, serve_concurrency, serve_seconds, budget_seconds, name):
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise click.ClickException("CUDA is not available (use --device cpu for a dry run)")
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    name = name or "gpu_check_" + "".join(c if c.isalnum() else "_" for c in gpu).strip("_").lower()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    check = Check(out, device, items, hidden, steps, exit_steps, tuple(int_list(batch_sizes)),
                  tuple(int_list(parity_batches)), seconds, n_requests, infer_batch, serve_concurrency, serve_seconds,
                  budget_seconds, name, f"GPU check on {gpu}")
    check.rep.update({"device": gpu, "torch": torch.__version__, "items": items})
    try:
        import onnxruntime as ort

        check.rep["onnxruntime"] = {"version": ort.__version__, "providers": ort.get_available_providers()}
    except ImportError:
        check.rep["errors"]["onnxruntime"] = "not installed"
    tmp = Path(tempfile.mkdtemp(prefix="cddrec-gpu-"))
    try:
        check.run(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the model, its graphs, 1M requests
        check.save()
    click.echo(table(check.rep))


if __name__ == "__main__":
    main()
