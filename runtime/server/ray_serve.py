"""The same app on Ray Serve: ``N`` replicas, one model each, behind Ray's HTTP proxy, same routes.

Each replica builds the Starlette app of ``create_app`` (``@serve.ingress`` with
``__serve_build_asgi_app__``), so it batches its own requests with the app's batcher and opens
the model at its startup. SIGHUP to the command reloads every replica (a new ``user_config``
generation: Ray calls ``reconfigure`` on each, which swaps to the newest version as on one
process); ``POST /v2/repository/models/{name}/load`` reloads the replica that answers it.
SIGTERM/SIGINT shuts the application down (Ray drains the replicas) and returns.

Ray Serve is for scaling out across machines or GPUs; on one small machine the proxy's extra hop
costs more than it brings (the one-process server is the default).
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
from pathlib import Path
from typing import Callable

from cddrec.errors import ConfigError

from .app import ServerConfig, create_app

log = logging.getLogger("cddrec.serve")
APP_NAME = "cddrec"


class CDDRecReplica:
    """One Ray Serve replica: the app of ``config`` (Ray wraps this class with ``serve.ingress``)."""

    def __init__(self, config: ServerConfig):
        # a replica asks Ray for at most one CPU: one engine instance each unless told (scale with --replicas)
        self.config = dataclasses.replace(config, reload_on_sighup=False, instances=config.instances or 1)
        self._app = None

    def __serve_build_asgi_app__(self):
        self._app = create_app(self.config)
        return self._app

    async def reconfigure(self, user_config: dict) -> None:
        """A new ``generation`` reloads the newest version (the first call, generation 0, is the deployment)."""
        if not user_config.get("generation") or self._app is None:
            return
        server = self._app.state.server
        if server.batcher is None:  # not started yet: it will open the newest version anyway
            return
        try:
            await server.reload()
        except Exception as e:  # noqa: BLE001 - the old version keeps serving; the error is logged
            log.error("replica reload failed: %s", e)


def deployment(config: ServerConfig, replicas: int = 1, replica_gpus: float | None = None, generation: int = 0):
    """The bound Ray Serve application: ``replicas`` x one model; a CPU each (less when the cluster has fewer
    CPUs than replicas), ``replica_gpus`` GPUs each (default: 1 for a CUDA backend, else 0)."""
    import ray
    from ray import serve

    from ..backends import backend_class

    gpus = replica_gpus if replica_gpus is not None else (1.0 if backend_class(config.backend).device == "cuda" else 0.0)
    cpus = min(1.0, max(0.1, float(ray.cluster_resources().get("CPU", 1)) / replicas))
    dep = serve.deployment(serve.ingress()(CDDRecReplica), name=APP_NAME, num_replicas=replicas,
                           ray_actor_options={"num_cpus": cpus, "num_gpus": gpus},
                           max_ongoing_requests=max(config.max_queue, config.max_batch),
                           user_config={"generation": generation})
    return dep.bind(config)


def serve_on_ray(config: ServerConfig, address: str, replicas: int = 1, replica_gpus: float | None = None,
                 host: str = "127.0.0.1", port: int = 8000, echo: Callable[[str], None] = print,
                 verbose: bool = False) -> None:
    """Deploy on Ray (``address``: 'local' starts Ray here, 'auto' or a cluster address joins one), say where,
    serve until SIGTERM/SIGINT; SIGHUP reloads every replica. A bad --model, a Ray head that does not answer
    and a deployment that fails are one line each; Ray's own logging stays out of the terminal unless
    ``verbose``."""
    from ray import serve

    from .. import raycluster
    from ..recommender import read_serving_info
    from .models import model_source

    source = model_source(config.model, config.name, config.backend)
    _, newest = source.newest()
    if source.reads == "graph":
        read_serving_info(newest)  # a graph that does not load fails here in one line, not inside a replica
    config = dataclasses.replace(config, model=str(Path(config.model).resolve()))  # replicas run elsewhere
    started = False
    try:
        with raycluster.quiet(verbose):
            started = raycluster.connect(address)
            _deploy(config, replicas, replica_gpus, host, port, generation=0)
        url = f"http://{host}:{port}"
        echo(f"cddrec-serve: ready at {url} on Ray Serve ({replicas} replica(s); POST {url}/v1/recommend, "
             f"POST {url}/v2/models/NAME/infer)")
        _serve_until_stopped(config, replicas, replica_gpus, host, port, echo, verbose)
        echo("cddrec-serve: shutting down the Ray Serve application")
        with raycluster.quiet(verbose):
            serve.shutdown()
    finally:
        if started:
            import ray

            with raycluster.quiet(verbose):
                ray.shutdown()
    echo("cddrec-serve: stopped")


def _deploy(config: ServerConfig, replicas: int, replica_gpus: float | None, host: str, port: int,
            generation: int) -> None:
    """(Re)deploy the application; a failure is one ``ConfigError`` line (Ray wraps the cause: a port in use, a
    replica that failed)."""
    from ray import serve

    try:
        if generation == 0:
            serve.start(http_options={"host": host, "port": port})
        serve.run(deployment(config, replicas, replica_gpus, generation), name=APP_NAME, route_prefix="/")
    except Exception as e:  # noqa: BLE001 - Ray's exception types vary by version; its last line names the cause
        lines = [x for x in str(e).splitlines() if x.strip()]
        what = "start the application" if generation == 0 else f"send reload {generation}"
        raise ConfigError(f"Ray Serve could not {what} on {host}:{port}: "
                          f"{lines[-1].strip() if lines else type(e).__name__}") from None


def _serve_until_stopped(config: ServerConfig, replicas: int, replica_gpus: float | None, host: str, port: int,
                         echo: Callable[[str], None], verbose: bool) -> None:
    """Wait for SIGTERM/SIGINT; each SIGHUP redeploys with a new generation (every replica reloads). A reload
    that fails is said in one line and the running application keeps serving."""
    from .. import raycluster

    stop, hup = threading.Event(), threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, lambda *_: hup.set())
    generation = 0
    while not stop.wait(0.2):
        if hup.is_set():
            hup.clear()
            generation += 1
            try:
                with raycluster.quiet(verbose):
                    _deploy(config, replicas, replica_gpus, host, port, generation)
                echo(f"cddrec-serve: reload {generation} sent to every replica")
            except ConfigError as e:
                echo(f"cddrec-serve: {e}; the running version keeps serving")
