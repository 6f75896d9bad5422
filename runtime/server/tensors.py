"""The tensor route's engine side: merge the infer requests of a batch, run the graph, split its outputs.

Rows of different history widths run together: each request's ``item_ids`` (n, S) is left-padded
with 0 to the batch's widest S, which the graph reads as the same history (0 is padding; the
Recommender pads the same way). Inputs without a history axis (``noise`` (T, batch, d) of a
stochastic graph) are concatenated along their batch axis. Item ids are checked again against the
model that runs the batch (a reload may have swapped it since the request was parsed): a request
out of its range fails alone.
"""

from __future__ import annotations

import numpy as np

from cddrec.contract import GraphContract

from .protocol import InferRequest, ProtocolError, check_item_ids, tensors_of


def merge_feeds(feeds: list[dict[str, np.ndarray]], contract: GraphContract) -> dict[str, np.ndarray]:
    """One feed of every request's rows, in order: item_ids (B, S_max) left-padded, others concatenated."""
    out = {}
    for spec in tensors_of(contract).inputs.values():
        arrs = [f[spec.name] for f in feeds]
        if len(arrs) == 1:
            out[spec.name] = arrs[0]
        elif spec.shape == ("batch", "history"):
            width = max(a.shape[1] for a in arrs)
            merged = np.zeros((sum(a.shape[0] for a in arrs), width), dtype=arrs[0].dtype)  # (B, S)
            r = 0
            for a in arrs:
                merged[r:r + a.shape[0], width - a.shape[1]:] = a
                r += a.shape[0]
            out[spec.name] = merged
        else:
            out[spec.name] = np.concatenate(arrs, axis=spec.shape.index("batch"))
    return out


class TensorRunner:
    """``fn(requests) -> [(model, outputs) or ProtocolError]`` for the batcher (on an engine worker)."""

    def __init__(self, models):
        self.models = models

    def __call__(self, payloads: list[InferRequest]) -> list:
        m = self.models.current
        c = m.contract
        names = tensors_of(c).inputs.keys()
        results: list = [None] * len(payloads)
        ok = []
        for i, p in enumerate(payloads):
            if p.inputs.keys() != names:
                results[i] = ProtocolError(f"the model was reloaded and now takes {list(names)}; resend the request",
                                           409)
            else:
                ok.append(i)
        if not ok:
            return results
        feed = merge_feeds([payloads[i].inputs for i in ok], c)
        ids = feed["item_ids"]
        if ids.size and int(ids.max()) > c.num_items:  # only after a reload to a smaller catalogue
            for i in list(ok):
                try:
                    check_item_ids(payloads[i].inputs["item_ids"], c.num_items)
                except ProtocolError as e:
                    results[i] = e
                    ok.remove(i)
            if not ok:
                return results
            feed = merge_feeds([payloads[i].inputs for i in ok], c)
        outs = m.for_batch(len(feed["item_ids"])).backend.infer(feed)
        r = 0
        for i in ok:
            n = payloads[i].rows
            results[i] = (m, {name: v[r:r + n] for name, v in outs.items()})
            r += n
        return results
