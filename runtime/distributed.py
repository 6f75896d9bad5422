"""``cddrec-infer --ray``: the same pipeline over many shards on a Ray cluster, through Ray Data.

    run_sharded(model, "requests/*.jsonl", "recs/", ray_address="local", actors=4)

Ray Data reads the shards (``read_binary_files``: a file, a directory or a glob of JSONL or
Parquet request files); ``map_batches`` sends each shard to a pool of actors, each of which loads
one :class:`Recommender` once (asking for ``gpus_per_actor`` GPUs, 1 by default for ort-cuda and
trt) and serves the shard with the single-process pipeline (:func:`run_batch`), so a shard's output
is exactly what ``cddrec-infer`` gives for that file alone. Every shard gets its own output,
``OUTDIR/<shard name>`` (suffix changed with ``--output-format``), and its own errors file whose
line numbers are lines of that shard. Duplicate users are caught within a shard, not across
shards. OUTDIR must be reachable from every node (a shared filesystem); ``local`` needs nothing.
"""

from __future__ import annotations

import glob
import os
import tempfile
from pathlib import Path

from cddrec.errors import CDDRecError, DataError

from .backends import backend_class
from .pipeline import BatchStats, engine_options
from .writers import output_format

SHARD_SUFFIXES = (".jsonl", ".json", ".ndjson", ".parquet", ".pq")
_SUFFIX = {"jsonl": ".jsonl", "csv": ".csv", "parquet": ".parquet"}


def expand_shards(spec: str) -> list[str]:
    """Shard paths of a file, a directory (its request files) or a glob, sorted."""
    if "://" in spec:
        return [spec]  # a remote URI: Ray Data lists it
    p = Path(spec)
    if p.is_dir():
        paths = sorted(str(x) for x in p.iterdir() if x.is_file() and x.suffix.lower() in SHARD_SUFFIXES)
    elif p.is_file():
        paths = [str(p)]
    else:
        paths = sorted(x for x in glob.glob(spec) if os.path.isfile(x))
    if not paths:
        raise DataError(f"{spec}: no request shards found (a file, a directory of .jsonl/.parquet files or a glob)")
    return paths


def shard_output(shard: str, out_dir: Path, out_fmt: str | None) -> Path:
    name = Path(shard).name
    if out_fmt:
        name = Path(name).stem + _SUFFIX[out_fmt]
    return out_dir / name


class ShardServer:
    """A Ray Data actor: one Recommender, loaded once, serving whole shards."""

    def __init__(self, model: str, backend: str, threads: int, options: dict, out_dir: str, out_fmt: str | None,
                 tf32: bool = False):
        from .recommender import Recommender

        self.rec = Recommender.load(model, backend=backend, threads=threads, k=options.get("k"),
                                    **engine_options(backend, tf32))
        self.options, self.out_dir, self.out_fmt = options, Path(out_dir), out_fmt

    def __call__(self, batch: dict) -> dict:
        from .pipeline import run_batch

        rows: dict[str, list] = {k: [] for k in ("shard", "output", "errors", "lines", "served", "bad",
                                                 "unknown_items", "fallbacks", "seconds")}
        for data, path in zip(batch["bytes"], batch["path"]):
            out = shard_output(path, self.out_dir, self.out_fmt)
            with tempfile.TemporaryDirectory(prefix="cddrec-shard-") as tmp:
                local = Path(tmp) / Path(path).name  # same name, so the format follows the suffix
                local.write_bytes(bytes(data))
                fmt = self.out_fmt or output_format(out, None)
                stats = run_batch(self.rec, local, out, output_format=fmt, **self.options)
            for key in ("lines", "served", "bad", "unknown_items", "fallbacks", "seconds"):
                rows[key].append(getattr(stats, key))
            rows["shard"].append(path)
            rows["output"].append(str(out))
            rows["errors"].append(stats.errors_path or "")
        return rows


def run_sharded(model: str, spec: str, out_dir: str | Path, *, ray_address: str = "local", actors: int | None = None,
                backend: str = "ort-cpu", threads: int = 1, gpus_per_actor: float | None = None,
                out_fmt: str | None = None, k: int | None = None, batch_size: int = 256, strict: bool = False,
                check_duplicates: bool = True, tf32: bool = False, log=None) -> tuple[BatchStats, list[dict]]:
    """Serve every shard of ``spec`` into ``out_dir`` on Ray; returns the totals and one row per shard."""
    try:
        import ray
    except ImportError as e:
        raise DataError("--ray needs Ray Data: pip install 'cddrec[ray]'") from e
    paths = expand_shards(spec)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir}: with --ray the output is a directory, and this is a file")
    out_dir.mkdir(parents=True, exist_ok=True)
    seen: dict[Path, str] = {}
    for p in paths:
        out = shard_output(p, out_dir, out_fmt)
        if "://" not in p and (out.resolve() == Path(p).resolve()):
            raise DataError(f"{out}: refusing to overwrite the input shard {p}; choose another output directory")
        if out in seen:
            raise DataError(f"{out}: shards {seen[out]} and {p} would write the same output; give the shards "
                            "distinct file names")
        seen[out] = p
    if not Path(model).exists():
        raise DataError(f"{model}: no such model file")
    if gpus_per_actor is None:
        gpus_per_actor = 1.0 if backend_class(backend).device == "cuda" else 0.0
    started = False
    if not ray.is_initialized():
        if ray_address == "local":
            ray.init(num_cpus=actors or os.cpu_count(), include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        else:
            ray.init(address=ray_address, log_to_driver=False)
        started = True
    try:
        import logging

        import ray.data

        logging.getLogger("ray.data").setLevel(logging.WARNING)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        cpus = float(ray.cluster_resources().get("CPU", 1))
        n_actors = actors or max(1, min(len(paths), int(cpus)))
        # reading is I/O: a sliver of CPU, so a pool that fills the cluster never starves the reads
        actor_cpus = min(float(max(1, threads)), max(0.1, (cpus - 0.2) / n_actors))
        ds = ray.data.read_binary_files(paths, include_paths=True, num_cpus=0.1)
        options = {"k": k, "batch_size": batch_size, "strict": strict, "check_duplicates": check_duplicates}
        ds = ds.map_batches(ShardServer, batch_size=1, compute=ray.data.ActorPoolStrategy(size=n_actors),
                            num_cpus=actor_cpus, num_gpus=gpus_per_actor or None,
                            fn_constructor_kwargs={"model": str(Path(model).resolve()), "backend": backend,
                                                   "threads": threads, "options": options,
                                                   "out_dir": str(out_dir.resolve()), "out_fmt": out_fmt,
                                                   "tf32": tf32})
        rows = sorted(ds.take_all(), key=lambda r: r["shard"])
    except Exception as e:  # noqa: BLE001 - a shard's own error (strict mode, bad file) comes back wrapped
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, CDDRecError) or "BadInput" in str(e):  # the actor's one-line error, as it was
            msg = str(cause).strip().splitlines()[-1]
            raise (type(cause) if isinstance(cause, CDDRecError) else DataError)(msg) from None
        raise
    finally:
        if started:
            ray.shutdown()
    total = BatchStats()
    for r in rows:
        total.add(BatchStats(lines=int(r["lines"]), served=int(r["served"]), bad=int(r["bad"]),
                             unknown_items=int(r["unknown_items"]), fallbacks=int(r["fallbacks"])))
        total.seconds = max(total.seconds, float(r["seconds"]))
    return total, rows
