"""``cddrec-export``: a model file to one validated ONNX graph (and a TensorRT engine, a Triton repository)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import click

from cddrec.contract import APPROX_MIN_OVERLAP, DEFAULT_K, DEFAULT_OPSET, DYNAMO_MIN_OPSET, MIN_OPSET
from cddrec.io import json_dumps, refuse_overwrite_inputs

from .options import CONTEXT, POSITIVE, echo_err, friendly_errors, k_option, lock_outputs, option


@click.command(context_settings=CONTEXT)
@click.argument("model", type=click.Path(dir_okay=False))
@option("--output", "-o", type=click.Path(dir_okay=False), hidden_aliases=("--out",),
        help="graph file [default: MODEL with .onnx]")
@k_option(DEFAULT_K, "top-k items the graph returns")
@option("--opset", default=DEFAULT_OPSET, show_default=True, type=click.IntRange(min=MIN_OPSET),
        help=f"ONNX opset (>= {MIN_OPSET}; the dynamo exporter writes >= {DYNAMO_MIN_OPSET})")
@option("--fp16", is_flag=True, help="fp16 matmuls; LayerNorm, softmax, scoring and TopK stay fp32")
@option("--stochastic", is_flag=True, help="add a noise input (T, batch, d): the sampled reverse chain")
@option("--optimize", is_flag=True,
        help="the fused graph: ONNX Runtime contrib ops (attention, BiasGelu); ONNX Runtime only, not --trt")
@option("--int8", is_flag=True,
        help="int8 MatMuls (dynamic quantization; with --optimize, of the fused graph), validated by top-k overlap")
@option("--int8-scoring", is_flag=True, help="with --int8: the scoring MatMul in int8 too")
@option("--rescore", default=0, show_default=True, type=click.IntRange(min=0),
        help="two-stage top-k for large catalogues: int8 scores pick this many candidates, rescored in fp32")
@option("--steps", type=click.IntRange(min=1), default=None,
        help="early exit: the graph runs the first S of the model's T reverse steps and serves that state "
             "(1..T; measure its quality with cddrec-eval --steps S) [default: all T]")
@option("--exporter", type=click.Choice(["torchscript", "dynamo"]), default="torchscript", show_default=True,
        help="torch.onnx exporter: the TorchScript tracer, or torch.export (dynamo, opset >= 18)")
@option("--vocab-sidecar/--vocab-inline", default=None,
        help="item vocabulary in MODEL.vocab.json beside the graph, or in its metadata [default: inline up to 200k items]")
@option("--trt", "trt_engine", type=click.Path(dir_okay=False), help="also build a TensorRT engine here")
@option("--trt-fp16", is_flag=True, help="fp16 TensorRT engine (needs --fp16: the engine's precision is the graph's)")
@option("--trt-max-batch", default=1024, show_default=True, type=POSITIVE,
        help="largest batch of the TensorRT optimization profile")
@option("--trt-opt-batch", default=256, show_default=True, type=POSITIVE,
        help="batch the TensorRT profile is tuned for (also Triton's preferred batch)")
@option("--triton-repo", type=click.Path(file_okay=False),
        help="also write a Triton model repository here: NAME/config.pbtxt, NAME/1/model.onnx, NAME/vocab.json")
@option("--triton-name", default="cddrec", show_default=True, help="model name in the Triton repository")
@option("--triton-cpu", is_flag=True, help="Triton instance group of kind CPU [default: GPU]")
@option("--triton-max-batch", default=1024, show_default=True, type=click.IntRange(min=0),
        help="Triton max_batch_size (0: no batching)")
@option("--triton-trt/--triton-no-trt", default=True, show_default=True,
        help="the onnxruntime backend's TensorRT accelerator on GPU (FP16 with --fp16 or --trt-fp16)")
@option("--triton-cuda-graphs", is_flag=True,
        help="CUDA graphs through the TensorRT accelerator (trt_cuda_graph_enable)")
@option("--force", is_flag=True,
        help="replace an existing Triton model folder (REPO/NAME) whole [default: refuse it]")
@option("--no-validate", is_flag=True, help="skip validation (not recommended)")
@option("--json", "as_json", is_flag=True, help="print the export report as JSON")
@friendly_errors
def main(model, output, k, opset, fp16, stochastic, optimize, int8, int8_scoring, rescore, steps, exporter, vocab_sidecar,
         trt_engine, trt_fp16, trt_max_batch, trt_opt_batch, triton_repo, triton_name, triton_cpu,
         triton_max_batch, triton_trt, triton_cuda_graphs, force, no_validate, as_json):
    """Export MODEL (model.pt) to one ONNX graph: encoder, T unrolled denoising steps, scoring,
    seen-item masking and top-k; validated against PyTorch before it is kept."""
    from cddrec.export.onnx_export import ExportOptions, TensorRTOptions, export_model
    from cddrec.export.triton import TritonOptions

    if Path(model).suffix.lower() == ".onnx":
        raise click.UsageError(f"{model} is an exported graph; cddrec-export takes the model file cddrec-train "
                               "wrote (model.pt)")
    if force and not triton_repo:
        raise click.UsageError("--force replaces a Triton model folder: use it with --triton-repo")
    out = output or str(Path(model).with_suffix(".onnx"))
    refuse_overwrite_inputs({"--output": out, "--trt": trt_engine,
                             "vocabulary file": Path(out).with_suffix(".vocab.json") if vocab_sidecar else None},
                            {"MODEL": model})
    lock_outputs(out, trt_engine, option="--output")  # a second export into the same files is refused from its start
    options = ExportOptions(k=k, opset=opset, exporter=exporter, fp16=fp16, stochastic=stochastic, optimize=optimize,
                            int8=int8, int8_scoring=int8_scoring, rescore=rescore, vocab_sidecar=vocab_sidecar,
                            validate=not no_validate, steps=steps)
    trt = TensorRTOptions(trt_engine, fp16=trt_fp16, max_batch=trt_max_batch, opt_batch=trt_opt_batch) \
        if trt_engine else None
    triton = TritonOptions(triton_repo, triton_name, gpu=not triton_cpu, max_batch=triton_max_batch,
                           tensorrt=triton_trt, cuda_graphs=triton_cuda_graphs, opt_batch=trt_opt_batch,
                           force=force) if triton_repo else None
    rep = export_model(model, out, options, trt, triton)
    if rep.k_requested:
        echo_err(f"note: --k {rep.k_requested} exceeds the {rep.contract['num_items']} items of the catalogue; "
                 f"the graph returns K={rep.contract['k']}")
    if as_json:
        click.echo(json_dumps(asdict(rep), indent=2))
        return
    click.echo(summary(rep))


def summary(rep) -> str:
    """The export report in a few lines."""
    c = rep.contract
    lines = [f"wrote {rep.path} ({rep.graph_bytes / 1e6:.2f} MB, {sum(rep.ops.values())} ops"
             + (f" -> {sum(rep.ops_optimized.values())} after optimization" if rep.ops_optimized else "") + ")"]
    if c.get("steps_run") is not None and c["steps_run"] != c["steps"]:
        lines.append(f"early exit: the graph runs {c['steps_run']} of the model's {c['steps']} reverse steps")
    if rep.max_abs_diff:
        diffs = ", ".join(f"batch {b}: {v:.2e}" for b, v in rep.max_abs_diff.items())
        verdict = ("top-k positions that differ from the reference beyond ties (an approximate graph, judged by "
                   "overlap): " if rep.topk_overlap else "top-k mismatches beyond ties: ")
        lines.append(f"validated against PyTorch: max |score diff| {diffs}; {verdict}{rep.topk_mismatches}; "
                     f"ORT session {rep.session_seconds * 1000:.0f} ms")
    if rep.topk_overlap:
        lines.append("approximate graph: top-k overlap with the fp32 reference " + ", ".join(
            f"batch {b}: {v:.3f}" for b, v in rep.topk_overlap.items()) + f" (declared minimum {APPROX_MIN_OVERLAP})")
    if rep.vocab_sidecar:
        lines.append(f"wrote {rep.vocab_sidecar}")
    if rep.trt_engine:
        lines.append(f"wrote TensorRT engine {rep.trt_engine}")
    if rep.triton_repo:
        lines.append(f"wrote Triton model repository {rep.triton_repo} (config.pbtxt, 1/model.onnx, vocab.json)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
