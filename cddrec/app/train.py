"""``cddrec-train``: train CDDRec on a sequence file or an interaction log.

Also ``python -m cddrec.app.train``, and under torchrun (DistributedDataParallel, one process per
GPU or CPU share)::

    torchrun --nproc-per-node 2 -m cddrec.app.train DATA -o model.pt --batch-size 64
    torchrun --nproc-per-node 2 --no-python cddrec-train DATA -o model.pt --batch-size 64

``--batch-size`` is per process there; rank 0 validates, logs and writes the files."""

from __future__ import annotations

import sys
from dataclasses import fields

import click

from cddrec.config import (
    CONFIGS,
    ModelConfig,
    RunConfig,
    TrainConfig,
    click_type,
    default_of,
    from_flat,
    preset_for,
    read_config_file,
)
from cddrec.io import refuse_overwrite_inputs

from .options import (
    CONTEXT,
    MAX_THREADS_PER_CORE,
    data_kwargs,
    data_options,
    echo_err,
    friendly_errors,
    lock_outputs,
    max_threads,
    option,
    progress_every_option,
)

SKIP_FIELDS = {"num_items", "extra"}  # set from the data, or free-form
HIDDEN_ALIASES = {"threads": ("--num-threads",)}  # spellings of earlier releases


def option_type(name: str):
    """The click type of a field's option: its declaration, and the thread cap of every command for ``threads``."""
    if name == "threads":
        return click.IntRange(0, max_threads())
    return click_type(name)


def config_options(fn):
    """One option per field of the model, train and run configs (``hidden_size`` -> ``--hidden-size``),
    default: unset (the config's default, a preset's, or the --config file's).

    Types, ranges and choices come from the field declarations (``cddrec.config.click_type``),
    the same declarations the configs check file values against."""
    for f in reversed([f for cls in CONFIGS for f in fields(cls)]):
        if f.name in SKIP_FIELDS:
            continue
        flag = f.name.replace("_", "-")
        help_ = f.metadata.get("help", "")
        if f.name == "threads":
            help_ += f"; at most {MAX_THREADS_PER_CORE} x the cores ({max_threads()})"
        help_ += f" [default: {default_of(f)}]"
        if isinstance(default_of(f), bool):
            fn = option(f"--{flag}/--no-{flag}", f.name, default=None, help=help_)(fn)
        else:
            fn = option(f"--{flag}", f.name, type=option_type(f.name), default=None, help=help_,
                        hidden_aliases=HIDDEN_ALIASES.get(f.name, ()))(fn)
    return fn


def build_config(data: str | None, config_file: str | None, preset: bool,
                 overrides: dict) -> tuple[ModelConfig, TrainConfig, RunConfig]:
    """Defaults <- dataset preset <- config file <- command-line flags, split into the three configs."""
    values: dict = {}
    if preset and data:
        values.update(preset_for(data))
    if config_file:
        values.update(read_config_file(config_file))
    values.update({k: v for k, v in overrides.items() if v is not None})
    return from_flat(values)


@click.command(context_settings=CONTEXT)
@click.argument("data", type=click.Path(dir_okay=False))
@option("--output", "-o", default="model.pt", show_default=True, type=click.Path(dir_okay=False),
        hidden_aliases=("--out",), help="model file to write (the best model by validation)")
@option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
        help="YAML or JSON file of config fields; flags override it")
@option("--preset/--no-preset", default=True, show_default=True,
        help="apply the paper's per-dataset settings when DATA is one of its four Amazon files")
@option("--resume", is_flag=True, help="continue from OUTPUT.resume.pt")
@option("--auto-resume", is_flag=True, help="continue from OUTPUT.resume.pt if it exists, else start (a job that "
        "torchrun --max-restarts restarts, a nightly job)")
@option("--quiet", is_flag=True, help="no progress bar or progress lines")
@progress_every_option()
@option("--summary-json", type=click.Path(dir_okay=False), help="write the training summary here")
@data_options
@config_options
@friendly_errors
def main(data, output, config_file, preset, resume, auto_resume, quiet, progress_every, summary_json, user_col,
         item_col, time_col, sep, **overrides):
    """Train CDDRec on DATA (`user item item ...` lines, or a CSV/TSV/Parquet log)."""
    from cddrec.data import load_data
    from cddrec.distributed import launch
    from cddrec.io import atomic_write_json
    from cddrec.training import train

    refuse_overwrite_inputs({"--output": output, "--summary-json": summary_json, "resume file": f"{output}.resume.pt"},
                            {"DATA": data, "--config": config_file})
    model_cfg, train_cfg, run_cfg = build_config(data, config_file, preset, overrides)
    with launch(run_cfg.device, run_cfg.dist_timeout) as dist:
        if dist.main:  # the rank that writes: a second training into the same files is refused from its start
            lock_outputs(output, summary_json)
        say = echo_err if dist.main else (lambda message: None)
        explicit_kcore = overrides.get("kcore") is not None or (config_file and "kcore" in read_config_file(config_file))
        ds = load_data(data, kcore=train_cfg.kcore if explicit_kcore else None,
                       **data_kwargs(user_col, item_col, time_col, sep))
        f = ds.filtered
        say(f"{data}: " + (f"k-core {f['kcore']} removed {f['users_removed']} users, {f['items_removed']} items, "
                           f"{f['interactions_removed']} interactions" if f["kcore"] > 1 else
                           "no k-core filter (a sequence file; --kcore N to filter)")
            + f"; {f['users_under_3_items']} users with fewer than 3 items skipped; {len(ds.users)} users, "
            f"{ds.num_items} items, {ds.num_interactions} interactions")
        tty = sys.stderr.isatty()
        summary = train(model_cfg, train_cfg, run_cfg, ds, output, resume=resume or ("auto" if auto_resume else False),
                        progress=not quiet and tty,
                        progress_every=0.0 if quiet or tty else progress_every, log=echo_err, dist=dist)
    if not dist.main:
        return
    click.echo(f"wrote {output}: best epoch {summary['best_epoch']}, valid "
               + " ".join(f"{k} {summary['best_valid'].get(k, float('nan')):.4f}" for k in ("R@10", "N@10", "MRR")))
    if summary_json:
        atomic_write_json(summary_json, {"model": str(output),
                                         "model_config": model_cfg.replace(num_items=ds.num_items).to_dict(),
                                         "train_config": train_cfg.to_dict(), "run_config": run_cfg.to_dict(),
                                         **summary})


if __name__ == "__main__":
    main()
