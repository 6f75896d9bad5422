"""``cddrec-serve``: an online server with dynamic batching (torch-free).

- ``app``: the ASGI app (KServe v2 / Triton HTTP routes, ``/v1/recommend``, ``/metrics``) and
  ``ServerConfig``; ``create_app(config)`` is the same app on uvicorn and on Ray Serve;
- ``http``: the glue under the routes (request body limits and decoding, JSON errors, metrics);
- ``protocol``: the KServe v2 JSON + binary tensor codec, checked against the graph contract;
- ``keys``: the key route (one codec with cddrec-infer); ``tensors``: the tensor route's engine side;
- ``batcher``: the dynamic batcher (queue, dispatcher, engine workers, backpressure, timeouts);
- ``models``: model versions and the atomic reload; ``metrics``: Prometheus metrics;
- ``standalone``: one process on uvicorn; ``ray_serve``: the same app on Ray Serve replicas.
"""
