"""The key-level route, ``POST /v1/recommend``: item keys in, item keys out, cddrec-infer's rules.

A request is ``{"user": key, "history": [item keys, oldest first], "k": 10}`` or a list of them;
``user`` (a string or integer, echoed back) and ``k`` (at most the graph's K) are optional. The answer,
per request, is ``{"user", "items", "scores", "source"}``: ``source`` is ``"model"``, or
``"popularity"`` where no history item is known and the training popularity top-k (scores are
counts) stands in.

Checks happen here, on the event loop, so that a bad request gets its 400 and never reaches a
batch (the one request rule, ``codec.request_problem``); encoding, inference and decoding happen per
batch on an engine worker (``KeyRunner``), with the one serving codec (``cddrec.runtime.codec``:
``encode_flat``, ``decode_rows``) and ``Recommender.infer_encoded`` (a lone request of one user:
``Recommender.recommend_one``, tested against it): the keys,
masking and fallback are exactly cddrec-infer's. Scores are rounded as cddrec-infer
writes them (``codec.round_scores``).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import numpy as np
import orjson

from cddrec.contract import GraphContract

from ..codec import decode_rows, encode_flat, request_problem, round_scores, source_of
from .protocol import ProtocolError

MAX_KEY_CHARS = 256  # longest user or item key accepted (Amazon ASINs have 10)


@dataclass
class KeyRequest:
    users: list
    histories: list[list]
    ks: list[int | None]  # None: the graph's K
    single: bool  # one object (answered with one object) or a list

    @property
    def size(self) -> int:
        return len(self.histories)

    @property
    def width(self) -> int:
        return max(len(h) for h in self.histories)


def _one(obj, where: str, contract: GraphContract) -> tuple[object, list, int | None]:
    """One request of a body, checked by the one request rule (``codec.request_problem``; ``user``
    optional, keys at most ``MAX_KEY_CHARS``), then its ``k``."""
    problem = request_problem(obj, user_required=False, max_key_chars=MAX_KEY_CHARS)
    if problem:
        raise ProtocolError(where + problem)
    user, hist = obj.get("user"), obj["history"]
    k = obj.get("k")
    if k is not None:
        if type(k) is not int:
            raise ProtocolError(f"{where}field 'k' must be an integer, got {type(k).__name__}")
        try:
            contract.check_k(k)
        except ValueError as e:
            raise ProtocolError(f"{where}field 'k': {e}") from None
    return user, hist, k


def parse_recommend(body: bytes, contract: GraphContract, max_batch: int) -> KeyRequest:
    """Decode and check a /v1/recommend body; ``ProtocolError`` (400) naming the request and field."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise ProtocolError(f"the request is not valid JSON ({e})") from None
    single = not isinstance(doc, list)
    objs = [doc] if single else doc
    if not objs:
        raise ProtocolError("expected a request object or a non-empty list of them")
    if len(objs) > max_batch:
        raise ProtocolError(f"{len(objs)} requests in one body; at most {max_batch} (--max-batch)")
    users, hists, ks = [], [], []
    for i, obj in enumerate(objs):
        user, hist, k = _one(obj, "" if single else f"request {i}: ", contract)
        users.append(user)
        hists.append(hist)
        ks.append(k)
    return KeyRequest(users, hists, ks, single)


class KeyRunner:
    """On an engine worker: encode a batch of key requests at once, infer, decode, serialize per request."""

    def __init__(self, models, batch_size: int):
        self.models, self.batch_size = models, batch_size

    def __call__(self, payloads: list[KeyRequest]) -> list[bytes]:
        m = self.models.current
        if len(payloads) == 1 and payloads[0].size == 1:  # a lone request of one user: the short path
            p = payloads[0]
            r = m.for_batch(1).recommend_one(p.histories[0], p.ks[0])
            return [_dump(p, [p.users[0]], [r.items], [round_scores(r.scores).tolist()], [r.source])]
        hists = [h for p in payloads for h in p.histories]
        rec = m.for_batch(len(hists))
        K = rec.contract.k
        offsets = np.array(list(accumulate(map(len, hists), initial=0)), dtype=np.int64)  # (n + 1,)
        flat = [k for h in hists for k in h]  # checked keys
        enc = encode_flat(flat, offsets, rec.mapper, rec.max_history)
        top = rec.infer_encoded(enc, K, self.batch_size)  # (n, K), popularity where nothing is known
        ks = [K if k is None else min(k, K) for p in payloads for k in p.ks]
        if min(ks) < K:
            top.valid &= np.arange(K)[None, :] < np.array(ks)[:, None]  # each request's own k
        top.scores = round_scores(top.scores)
        keys, scores = decode_rows(top, rec.mapper)
        sources = [source_of(f) for f in top.fallback.tolist()]
        out, i = [], 0
        for p in payloads:
            j = i + len(p.users)
            out.append(_dump(p, p.users, keys[i:j], scores[i:j], sources[i:j]))
            i = j
        return out


def _dump(p: KeyRequest, users: list, items: list, scores: list, sources: list) -> bytes:
    """The answer to one body: an object per request (one object for a single request)."""
    recs = [{"user": u, "items": it, "scores": sc, "source": so} for u, it, sc, so in zip(users, items, scores, sources)]
    return orjson.dumps(recs[0] if p.single else recs)
