"""``cddrec-eval``: the paper's protocol on a data file: leave-one-out, full ranking, seen items excluded."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from cddrec.io import json_dumps, refuse_overwrite_inputs
from cddrec.metrics import TOPK

from .options import (
    CONTEXT,
    data_kwargs,
    data_options,
    device_option,
    echo_err,
    friendly_errors,
    k_option,
    lock_outputs,
    option,
)

METRIC_COLUMNS = ["R@1", "R@5", "R@10", "R@20", "N@5", "N@10", "N@20", "MRR", "MRR@40", "AvgChange@40"]


@click.command(context_settings=CONTEXT)
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("data", type=click.Path(dir_okay=False))
@option("--split", type=click.Choice(["test", "valid"]), default="test", show_default=True,
        help="test: predict each user's last item; valid: the one before it")
@option("--json", "as_json", is_flag=True, help="print the result as JSON")
@option("--save-topk", type=click.Path(dir_okay=False), help="write JSONL top-k lists here")
@k_option(TOPK, "list length for --save-topk (shorter where fewer items are rankable)", hidden_aliases=("--topk",))
@option("--stages", is_flag=True, help="also rank with every intermediate denoising state")
@option("--steps", type=click.IntRange(min=1), default=None,
        help="early exit: rank with the state after the first S of the model's T reverse steps, as "
             "cddrec-export --steps S serves it (1..T) [default: all T]")
@option("--eval-batch-size", default=512, show_default=True, type=click.IntRange(min=1),
        hidden_aliases=("--batch-size",), help="users per evaluation batch")
@device_option()
@data_options
@friendly_errors
def main(model, data, split, as_json, save_topk, k, stages, steps, eval_batch_size, device, user_col, item_col, time_col,
         sep):
    """Evaluate MODEL on DATA: leave-one-out, full ranking, seen items excluded."""
    from cddrec.checkpoint import load_checkpoint
    from cddrec.evaluation import evaluate_file, format_table, write_topk
    from cddrec.training import resolve_device
    from cddrec.vocab import Vocab

    refuse_overwrite_inputs({"--save-topk": save_topk}, {"MODEL": model, "DATA": data})
    lock_outputs(save_topk, option="--save-topk")
    net, ckpt = load_checkpoint(model)
    net.to(resolve_device(device))
    vocab = Vocab.from_dict(ckpt["vocab"])
    res = evaluate_file(net, vocab, data, split, read_options=data_kwargs(user_col, item_col, time_col, sep),
                        batch_size=eval_batch_size, stages=stages, keep_topk=k if save_topk else 0,
                        progress=sys.stderr.isatty(), steps=steps)
    if ckpt.get("data", {}).get("fingerprint") not in (None, res.fingerprint):
        echo_err(f"warning: {data} differs from the data {model} was trained on (after its filters)")
    rep = res.report
    echo_err(f"{data}: evaluated {rep['users_evaluated']} of {rep['users_in_file']} users (no filter); "
             f"skipped {rep['users_under_3_items']} with fewer than 3 items; dropped "
             f"{rep['unknown_history_items_dropped']} history items unknown to the model; "
             f"{rep['unknown_targets_counted_as_misses']} targets unknown to the model counted as misses")
    out = {"dataset": Path(data).stem, "split": split, "model": str(model), **res.metrics, "data": rep}
    if steps is not None:
        out["steps"] = {"run": steps, "of": net.steps}
    if stages:
        out["stages"] = res.stages
    if save_topk:
        n = write_topk(save_topk, res.user_keys, res, vocab)
        echo_err(f"wrote {n} top-{k} lists to {save_topk} (cut where the rankable items end)")
    if as_json:
        click.echo(json_dumps(out, indent=2))
        return
    click.echo(f"{out['dataset']} {split}: {res.metrics['users']} users"
               + (f" (early exit: the state after {steps} of {net.steps} reverse steps)" if steps is not None else ""))
    click.echo(format_table([res.metrics], METRIC_COLUMNS))
    if stages:
        click.echo(format_table(res.stages, ["stage", "step", "R@10", "N@10", "MRR@40", "AvgChange@40"]))


if __name__ == "__main__":
    main()
