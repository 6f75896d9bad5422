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

Errors are the single-process run's, naming the shard: an actor returns a shard's one-line error
instead of raising it (so Ray neither retries nor prints a traceback). Shards are written to a
staging folder inside OUTDIR and moved into place when the run ends: with ``strict``, one bad
line anywhere leaves OUTDIR as it was; otherwise the shards that failed (an unreadable file) are
listed and the others are kept. OUTDIR holds a lock for the run, as any output does. Ray's own
logging stays out of the terminal unless ``verbose``.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from cddrec.errors import CDDRecError, DataError
from cddrec.io import host_tag, output_lock, pid_alive

from . import raycluster
from .backends import backend_class, engine_options
from .pipeline import BatchStats
from .writers import output_format

SHARD_SUFFIXES = (".jsonl", ".json", ".ndjson", ".parquet", ".pq")
_SUFFIX = {"jsonl": ".jsonl", "csv": ".csv", "parquet": ".parquet"}
_STATS = ("lines", "served", "bad", "unknown_items", "fallbacks", "seconds")


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
    """A Ray Data actor: one Recommender, loaded once, serving whole shards into the staging folder."""

    def __init__(self, model: str, backend: str, threads: int, options: dict, out_dir: str, out_fmt: str | None,
                 tf32: bool = False):
        from .recommender import Recommender

        self.rec = Recommender.load(model, backend=backend, threads=threads, k=options.get("k"),
                                    **engine_options(backend, tf32))
        self.options, self.out_dir, self.out_fmt = options, Path(out_dir), out_fmt

    def __call__(self, batch: dict) -> dict:
        rows: dict[str, list] = {k: [] for k in ("shard", "output", "errors", "error", *_STATS)}
        for data, path in zip(batch["bytes"], batch["path"]):
            out = shard_output(path, self.out_dir, self.out_fmt)
            stats, error = BatchStats(), ""
            try:
                stats = self.serve_shard(bytes(data), path, out)
            except CDDRecError as e:  # the shard's one-line error, returned: Ray would retry and print a traceback
                error = str(e)
            for key in _STATS:
                rows[key].append(getattr(stats, key))
            rows["shard"].append(path)
            rows["output"].append(str(out))
            rows["errors"].append(stats.errors_path or "")
            rows["error"].append(error)
        return rows

    def serve_shard(self, data: bytes, path: str, out: Path) -> BatchStats:
        from .pipeline import run_batch

        with tempfile.TemporaryDirectory(prefix="cddrec-shard-") as tmp:
            local = Path(tmp) / Path(path).name  # same name, so the format follows the suffix
            local.write_bytes(data)
            fmt = self.out_fmt or output_format(out, None)
            try:
                return run_batch(self.rec, local, out, output_format=fmt, name=path, **self.options)
            except CDDRecError as e:  # messages name the shard, never the actor's copy of it
                raise type(e)(str(e).replace(str(local), path)) from None


def _staging_pattern() -> re.Pattern:
    return re.compile(r"^\.cddrec-ray\.([A-Za-z0-9-]+)\.(\d+)\.tmp$")


def _remove_stale_staging(out_dir: Path) -> None:
    """Staging folders of earlier runs on this host whose process is gone (``kill -9``)."""
    for p in out_dir.iterdir():
        m = _staging_pattern().match(p.name)
        if m and m.group(1) == host_tag() and int(m.group(2)) != os.getpid() and not pid_alive(int(m.group(2))):
            shutil.rmtree(p, ignore_errors=True)


def _commit(staging: Path, out_dir: Path, rows: list[dict]) -> None:
    """Move the outputs (and errors files) of the shards that succeeded from ``staging`` into
    ``out_dir``; an errors file of an earlier run is removed where this run found no bad line."""
    for r in rows:
        if r["error"]:
            continue
        out = Path(r["output"])
        os.replace(staging / out.name, out_dir / out.name)
        err = out.name + ".errors.jsonl"
        if r["errors"]:
            os.replace(staging / err, out_dir / err)
            r["errors"] = str(out_dir / err)
        else:
            (out_dir / err).unlink(missing_ok=True)
        r["output"] = str(out_dir / out.name)


def run_sharded(model: str, spec: str, out_dir: str | Path, *, ray_address: str = "local", actors: int | None = None,
                backend: str = "ort-cpu", threads: int = 1, gpus_per_actor: float | None = None,
                out_fmt: str | None = None, k: int | None = None, batch_size: int = 256, strict: bool = False,
                check_duplicates: bool = True, tf32: bool = False, keys: str = "auto",
                verbose: bool = False) -> tuple[BatchStats, list[dict]]:
    """Serve every shard of ``spec`` into ``out_dir`` on Ray; returns the totals (``seconds``: the whole
    run's, Ray's start included) and one row per shard (``error`` is the one-line error of a shard
    that failed, else ""); ``summary_lines`` words them.

    With ``strict``, the first error (in shard order) is raised and nothing is written."""
    t0 = time.perf_counter()
    ray = raycluster.import_ray()
    paths = expand_shards(spec)
    out_dir = Path(out_dir)
    _check_outputs(paths, out_dir, out_fmt)
    if not Path(model).exists():
        raise DataError(f"{model}: no such model file")
    if gpus_per_actor is None:
        gpus_per_actor = 1.0 if backend_class(backend).device == "cuda" else 0.0
    options = {"k": k, "batch_size": batch_size, "strict": strict, "check_duplicates": check_duplicates,
               "keys": keys}
    with output_lock(out_dir, option="--output", make_folder=True):
        _remove_stale_staging(out_dir)
        staging = out_dir / f".cddrec-ray.{host_tag()}.{os.getpid()}.tmp"
        staging.mkdir()
        try:
            with raycluster.quiet(verbose):
                rows = _run_on_ray(ray, ray_address, paths, model, backend, threads, gpus_per_actor, options, staging,
                                   out_fmt, tf32, actors)
            failed = [r for r in rows if r["error"]]
            if strict and failed:
                raise DataError(failed[0]["error"])
            _commit(staging, out_dir, rows)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    total = BatchStats()
    for r in rows:
        total.add(BatchStats(lines=int(r["lines"]), served=int(r["served"]), bad=int(r["bad"]),
                             unknown_items=int(r["unknown_items"]), fallbacks=int(r["fallbacks"])))
    total.seconds = time.perf_counter() - t0
    return total, rows


def summary_lines(stats: BatchStats, rows: list[dict], out_dir: str | Path) -> list[str]:
    """What ``cddrec-infer --ray`` prints after ``run_sharded``: each failed shard's error, the totals,
    and where the outputs (and any errors files) went."""
    failed = [r for r in rows if r["error"]]
    bad = [r["errors"] for r in rows if r["errors"]]
    return ([f"Error: {r['error']}" for r in failed]
            + [stats.summary() + f", shards {len(rows)}",
               f"wrote {len(rows) - len(failed)} outputs to {out_dir}"
               + (f"; bad lines in {len(bad)} errors files" if bad else "")
               + (f"; {len(failed)} shards failed and were not written" if failed else "")])


def _check_outputs(paths: list[str], out_dir: Path, out_fmt: str | None) -> None:
    seen: dict[Path, str] = {}
    for p in paths:
        out = shard_output(p, out_dir, out_fmt)
        if "://" not in p and (out.resolve() == Path(p).resolve()):
            raise DataError(f"{out}: refusing to overwrite the input shard {p}; choose another output directory")
        if out in seen:
            raise DataError(f"{out}: shards {seen[out]} and {p} would write the same output; give the shards "
                            "distinct file names")
        seen[out] = p


def _run_on_ray(ray, ray_address, paths, model, backend, threads, gpus_per_actor, options, staging, out_fmt, tf32,
                actors) -> list[dict]:
    started = raycluster.connect(ray_address, num_cpus=actors)
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
        ds = ds.map_batches(ShardServer, batch_size=1, compute=ray.data.ActorPoolStrategy(size=n_actors),
                            num_cpus=actor_cpus, num_gpus=gpus_per_actor or None,
                            fn_constructor_kwargs={"model": str(Path(model).resolve()), "backend": backend,
                                                   "threads": threads, "options": options,
                                                   "out_dir": str(staging.resolve()), "out_fmt": out_fmt,
                                                   "tf32": tf32})
        return sorted(ds.take_all(), key=lambda r: r["shard"])
    except Exception as e:  # noqa: BLE001 - an error outside the shards' own (a model that does not load)
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, CDDRecError):  # the actor's one-line error, as it was
            raise type(cause)(str(cause).strip().splitlines()[-1]) from None
        raise
    finally:
        if started:
            ray.shutdown()


