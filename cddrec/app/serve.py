"""``cddrec-serve``: an online server with dynamic batching (KServe v2 / Triton HTTP and a key route)."""

from __future__ import annotations

import click

from cddrec.runtime.backends import (
    available_backends,
    available_cores,
    backend_class,
    engine_options,
    tf32_backends,
    tf32_problem,
)

from .options import (
    CONTEXT,
    MAX_THREADS_PER_CORE,
    POSITIVE,
    Finite,
    echo_err,
    friendly_errors,
    option,
    threads_option,
)


@click.command(context_settings=CONTEXT)
@option("--model", "model_path", required=True, type=click.Path(),
        help="exported graph (.onnx), or a model folder of versions NAME/1/model.onnx, NAME/2/... "
             "(as --triton-repo writes; the newest is served)")
@option("--model-name", default=None, help="model name in /v2/models/NAME [default: the graph's stem or the folder's name]")
@option("--host", default="127.0.0.1", show_default=True, help="address to listen on (0.0.0.0: every interface)")
@option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="port (0: any free port)")
@option("--backend", type=click.Choice(sorted(available_backends())), default="ort-cpu", show_default=True,
        help="engine that runs the graph")
@threads_option(help_="CPU threads of each engine instance (0: the cores divided among the instances)")
@option("--workers", type=click.IntRange(1, 64), default=1, show_default=True,
        help="server processes sharing the port, each with its own model, batcher and engine instances on its "
             "share of the cores (like uvicorn's workers); not with --ray (use --replicas)")
@option("--pin", is_flag=True,
        help="with --workers N: bind each worker process to its own equal share of the cores (Linux; N must "
             "divide the CPUs this process may use)")
@option("--instances", type=click.IntRange(0, 256), default=0,
        help="engine workers running batches side by side on one loaded model, like Triton's instance count "
             "[default: 0, the backend's choice: ort-cpu one single-thread instance per core (or the cores "
             "divided by --threads); the other backends run one batch at a time and refuse more than 1]")
@option("--max-batch", type=POSITIVE, default=256, show_default=True,
        help="most users per engine batch (and per request)")
@option("--max-wait-ms", type=Finite(min=0, max=60_000), default=2.0, show_default=True,
        help="once the engine is free, how long a batch may wait for more users (a request on an idle engine "
             "never waits)")
@option("--idle-poll-ms", type=Finite(min=0, max=1000), default=1.0, show_default=True,
        help="ort-cpu: after a lone request ran on an idle engine, how long the event loop keeps polling for the "
             "next one instead of sleeping (lower latency for a lone client; costs up to this much CPU per "
             "request, a whole core under a steady stream of lone requests; 0: off)")
@option("--max-queue", type=POSITIVE, default=1024, show_default=True,
        help="most users waiting for the engine; beyond it: 503 with Retry-After")
@option("--timeout-ms", type=Finite(min=0, min_open=True, max=86_400_000), default=10_000, show_default=True,
        help="per-request timeout (504)")
@option("--max-body-bytes", type=POSITIVE, default=4 << 20, show_default=True, help="largest request body (413)")
@option("--access-log", is_flag=True, help="one JSON line per request on stderr")
@option("--tf32", is_flag=True, help=f"{'/'.join(tf32_backends())}: allow TF32 matmuls (faster, not fp32 parity)")
@option("--ray", "ray_address", default=None,
        help="deploy on Ray Serve: 'local' (start Ray here), 'auto' or a cluster address")
@option("--replicas", type=POSITIVE, default=1, show_default=True, help="Ray Serve replicas, one model each")
@option("--replica-gpus", type=Finite(min=0), default=None,
        help="GPUs per Ray Serve replica [default: 1 for the CUDA backends, else 0]")
@option("--verbose", is_flag=True, help="show Ray's own logging (with --ray)")
@friendly_errors
def main(model_path, model_name, host, port, backend, workers, pin, threads, instances, max_batch, max_wait_ms, idle_poll_ms,
         max_queue, timeout_ms, max_body_bytes, access_log, tf32, ray_address, replicas, replica_gpus, verbose):
    """Serve an exported graph online: KServe v2 (what Triton speaks over HTTP), POST /v1/recommend, /metrics."""
    from cddrec.runtime.server.app import ServerConfig

    if model_name is not None and (not model_name.strip() or "/" in model_name):
        raise click.BadParameter(f"{model_name!r}: a model name is one path segment of /v2/models/NAME (not empty, "
                                 "no '/')", param_hint="--model-name")
    if tf32 and tf32_problem(backend):
        raise click.BadParameter("--" + tf32_problem(backend), param_hint="--tf32")
    if (click.get_current_context().get_parameter_source("idle_poll_ms") is click.core.ParameterSource.COMMANDLINE
            and not backend_class(backend).concurrent_runs):
        raise click.BadParameter(f"the {backend} backend runs every batch on its engine thread, so there is no idle "
                                 "poll to set (ort-cpu only)", param_hint="--idle-poll-ms")
    cores = available_cores()
    if workers * max(1, threads) > MAX_THREADS_PER_CORE * cores:
        raise click.BadParameter(f"{workers} worker(s) x {max(1, threads)} thread(s) is over {MAX_THREADS_PER_CORE} "
                                 f"x the {cores} cores this process may use", param_hint="--workers")
    if ray_address is not None and workers > 1:
        raise click.UsageError("--workers is for one machine; on Ray Serve scale with --replicas")
    if pin:
        from cddrec.runtime.server.standalone import pin_problem, usable_cpus

        problem = "not with --ray" if ray_address is not None else pin_problem(workers, usable_cpus())
        if problem:
            raise click.BadParameter(problem, param_hint="--pin")
    if ray_address is None and (replicas != 1 or replica_gpus is not None):
        raise click.UsageError("--replicas and --replica-gpus deploy on Ray Serve: add --ray local|auto|ADDRESS")
    config = ServerConfig(model_path, model_name, backend, threads, engine_options(backend, tf32), max_batch,
                          max_wait_ms, max_queue, timeout_ms, max_body_bytes, access_log, instances=instances,
                          idle_poll_ms=idle_poll_ms, workers=workers, pin=pin)
    try:
        _ = config.layout  # a backend that cannot run side by side refuses --instances > 1 here
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--instances") from None
    if ray_address:
        from cddrec.runtime.server.ray_serve import serve_on_ray

        serve_on_ray(config, ray_address, replicas, replica_gpus, host, port, echo=echo_err, verbose=verbose)
        return
    from cddrec.runtime.server.standalone import serve

    serve(config, host, port, echo=echo_err)


if __name__ == "__main__":
    main()
