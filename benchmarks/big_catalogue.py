"""Big catalogues: peak memory and time per batch of the sampled softmax against the full softmax (ce).

    python -m cddrec.benchmarks.big_catalogue --items 100000,1000000 --batches 3 --repeats 2

The data is ``cddrec.synthetic.make_synthetic`` scaled up: ``items / 100`` clusters, each an ordered
chain of 100 items; a user (``items / 4`` of them, 5 to 30 interactions each) starts at a random
item of a random cluster and at each step follows the chain (75%), jumps to a random item of the
same cluster (15%) or shifts intent to a random cluster (10%), never repeating one of the last 3
items. Items are ids of the chains, shuffled, so the next item is predictable only from the
sequence; every item has about 4 interactions (popularity is nearly flat).

Each (catalogue, variant, repeat) runs in its own process (VmHWM, the peak resident memory, is per
process), variants interleaved within a repeat, one CPU thread each, under an address-space cap
(``--memory-cap-gb``) so a variant that does not fit fails with an allocation error instead of
pressing the machine into swap. A child builds the real ``Trainer`` (paper-size model: d=128, 1
layer, L=20, T=20, batch 128), runs one warm-up batch and ``--batches`` timed ones (forward,
backward, Adam step), and reports the seconds per batch and VmHWM; the epoch time is the seconds
per batch times the batches per epoch (an estimate: a full epoch is not run).
"""

from __future__ import annotations

import json
import pickle
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from cddrec.errors import first_line

from .latency import status_mb
from .options import int_list
from .record import RESULTS_DIR, record

VARIANTS: dict[str, dict] = {
    # the ranking term at the last step for both: the objective's own cost, like for like
    "ce": {"loss": "ce", "rank_steps": "last"},
    "sampled": {"loss": "sampled", "rank_steps": "last"},
    # what --loss auto --rank-steps auto trains on a big catalogue: M=2048 columns x T=20 <= 100k, every step
    "sampled (rank_steps auto: every step)": {"loss": "sampled", "rank_steps": "auto"},
}


def synthetic_data(items: int, cache: Path):
    """The scaled synthetic data set of ``items`` items (pickled in ``cache`` once) and its generation seconds."""
    from cddrec.synthetic import make_synthetic

    path = cache / f"synthetic_{items}.pkl"
    if path.exists():
        return path, None
    t0 = time.perf_counter()
    data = make_synthetic(num_users=items // 4, num_items=items, num_clusters=max(1, items // 100), min_len=5,
                          max_len=30, seed=0)
    seconds = time.perf_counter() - t0
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=pickle.HIGHEST_PROTOCOL)
    return path, seconds


def child(spec: dict) -> dict:
    """One variant on one data set, in this process: seconds per batch and peak memory (or 'does not fit')."""
    cap = int(spec["memory_cap_gb"] * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    from cddrec.config import from_flat
    from cddrec.training import Trainer

    with open(spec["data"], "rb") as f:
        data = pickle.load(f)
    cfgs = from_flat({**VARIANTS[spec["variant"]], "threads": 1, "seed": 0, "negatives": spec["negatives"]})
    out = {"variant": spec["variant"], "items": data.num_items, "stats": data.stats()}
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(*cfgs, data, Path(tmp) / "m.pt", progress=False, log=lambda m: None)
        out.update(batches_per_epoch=len(trainer.batches), objective=trainer.objective_words(),
                   rank_last_only=cfgs[1].rank_last_only(trainer.model_cfg),
                   rss_after_setup_mb=status_mb("VmRSS"), peak_after_setup_mb=status_mb("VmHWM"))
        trainer.model.train()
        seconds, parts, targets = [], [], []
        try:
            for i, batch in enumerate(trainer.batches.epoch(index=0)):
                if i > spec["batches"]:
                    break
                targets.append(int((batch["targets"] > 0).sum()))
                t0 = time.perf_counter()
                loss, _ = trainer.forward(batch)
                t1 = time.perf_counter()
                trainer.opt.zero_grad(set_to_none=True)  # Trainer.step, timed in its two parts
                loss.backward()
                t2 = time.perf_counter()
                trainer.opt.step()
                t3 = time.perf_counter()
                if i:  # the first batch warms up
                    seconds.append(t3 - t0)
                    parts.append((t1 - t0, t2 - t1, t3 - t2))
        except (RuntimeError, MemoryError) as e:
            tried = re.search(r"allocate (\d+) bytes", str(e))
            out.update(fits=False, error=first_line(e, 200),
                       tried_alloc_gb=round(int(tried.group(1)) / 2**30, 2) if tried else None)
        else:
            out["fits"] = True
    out.update(seconds_per_batch=seconds, targets_per_batch=targets, peak_mb=status_mb("VmHWM"))
    if seconds:
        out["mean_seconds_per_batch"] = sum(seconds) / len(seconds)
        out["mean_forward_backward_adam"] = [sum(p[k] for p in parts) / len(parts) for k in range(3)]
        out["epoch_seconds_estimate"] = out["mean_seconds_per_batch"] * out["batches_per_epoch"]
    return out


def run_child(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "cddrec.benchmarks.big_catalogue", "--child", json.dumps(spec)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**spec, "fits": None, "error": f"no result within {timeout:.0f} s"}
    lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
    if r.returncode != 0 or not lines:
        return {**spec, "fits": False, "error": (r.stderr.strip().splitlines() or ["?"])[-1][:200],
                "returncode": r.returncode}
    return {**spec, **json.loads(lines[-1])}


def table(rows: list[dict]) -> str:
    out = ["| items | variant | run | fits | s/batch (mean of timed) | forward / backward / Adam s | epoch s (estimate) | "
           "batches/epoch | targets/batch | peak MB (VmHWM) | RSS after setup MB |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s, epoch = r.get("mean_seconds_per_batch"), r.get("epoch_seconds_estimate")
        tgt = r.get("targets_per_batch") or []
        fb = r.get("mean_forward_backward_adam")
        fits = "yes" if r.get("fits") else "no: " + (f"failed to allocate {r['tried_alloc_gb']} GB more"
                                                      if r.get("tried_alloc_gb") else str(r.get("error", ""))[:90])
        out.append(f"| {r.get('items', r.get('catalogue')):,} | {r['variant']} | {r['repeat'] + 1} | {fits} | "
                   f"{'-' if s is None else f'{s:.2f}'} | {'-' if not fb else ' / '.join(f'{x:.2f}' for x in fb)} | "
                   f"{'-' if epoch is None else f'{epoch:.0f}'} | {r.get('batches_per_epoch', '-')} | "
                   f"{round(sum(tgt) / len(tgt)) if tgt else '-'} | {r.get('peak_mb', 0):,.0f} | "
                   f"{r.get('rss_after_setup_mb', 0):,.0f} |")
    return "\n".join(out)


@click.command()
@click.option("--items", "sizes", default="100000,1000000", show_default=True, help="catalogue sizes, comma-separated")
@click.option("--variants", default=",".join(VARIANTS), show_default=True)
@click.option("--batches", default=3, show_default=True, help="timed batches per run (after one warm-up batch)")
@click.option("--repeats", default=2, show_default=True, help="runs per variant, interleaved")
@click.option("--negatives", default=2048, show_default=True)
@click.option("--memory-cap-gb", default=8.0, show_default=True, help="address-space cap of each run")
@click.option("--timeout", default=600.0, show_default=True, help="seconds one run may take")
@click.option("--cache", type=click.Path(file_okay=False), help="where the generated data is kept [a temp folder]")
@click.option("--name", default="big_catalogue", show_default=True)
@click.option("--out", "out_dir", default=str(RESULTS_DIR), show_default=True)
@click.option("--child", "child_spec", hidden=True, help="run one variant in this process (a JSON spec)")
def main(sizes, variants, batches, repeats, negatives, memory_cap_gb, timeout, cache, name, out_dir, child_spec):
    """Sampled softmax against the full softmax on synthetic catalogues of up to a million items."""
    if child_spec:
        click.echo(json.dumps(child(json.loads(child_spec))))
        return
    names = [v.strip() for v in variants.split(",")]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise click.BadParameter(f"unknown variants {unknown}: expected some of {list(VARIANTS)}")
    rows, generated = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = Path(cache or tmp)
        cache_dir.mkdir(parents=True, exist_ok=True)
        for items in int_list(sizes):
            path, seconds = synthetic_data(items, cache_dir)
            if seconds is not None:
                generated[items] = round(seconds, 1)
                click.echo(f"generated {items:,} items in {seconds:.1f} s", err=True)
            for rep in range(repeats):
                for v in names:
                    spec = {"data": str(path), "variant": v, "batches": batches, "negatives": negatives,
                            "memory_cap_gb": memory_cap_gb, "repeat": rep, "catalogue": items}
                    row = run_child(spec, timeout)
                    rows.append(row)
                    click.echo(f"{items:,} {v} #{rep}: fits {row.get('fits')} "
                               f"s/batch {row.get('mean_seconds_per_batch')} peak MB {row.get('peak_mb')}", err=True)
    text = table(rows) + (
        f"\n\nPaper-size model (d=128, 1 layer, 4 heads, L=20, T=20), batch 128, 1 CPU thread per run, "
        f"--negatives {negatives} (popularity proposal), runs interleaved, each in its own process under a "
        f"{memory_cap_gb:g} GB address-space cap. Synthetic data (cddrec.synthetic scaled up): items/100 chains of "
        "100 items, items/4 users of 5-30 interactions that follow a chain (75%), jump inside it (15%) or shift to "
        "another chain (10%). Generation seconds: " + (json.dumps(generated) if generated else "cached") + ".")
    record(name, {"rows": rows, "generated_seconds": generated, "negatives": negatives,
                  "memory_cap_gb": memory_cap_gb}, text, out_dir, title="Sampled softmax against the full softmax on "
                                                                       "big synthetic catalogues")
    click.echo(text)


if __name__ == "__main__":
    main()
