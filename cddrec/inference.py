"""The plain PyTorch reference for serving, and the one masking rule.

Every fast path (the exported ONNX graph, TensorRT engines, CUDA graphs, the model's hoisted
last-position path) is checked against ``reference_topk``: the plain eager model, its Python
loop over the T steps decoding every position and projecting the history at every step.

``item_ids`` (B, S), S >= 1, left-padded with 0 (ids outside 1..N count as padding): the most
recent L items feed the model and all S are excluded from the ranking, together with the padding row and the mask token
(``exclude_items``, used by evaluation, the reference and the graph alike).

Letters: B batch, S history length given, L model length, V = N + 2 item rows, K top-k.
"""

from __future__ import annotations

import numpy as np
import torch

from .contract import MASK_SCORE
from .model import CDDRec


def valid_ids(item_ids: torch.Tensor, num_items: int) -> torch.Tensor:
    """(B, S) with every id outside 1..N (negative, the mask token N + 1, beyond the catalogue) set to
    padding 0, so no request can wrap around an index (-1 would read the mask-token row) or read past
    the table. The graph and the reference both apply it first."""
    return item_ids.masked_fill((item_ids < 1) | (item_ids > num_items), 0)  # (B, S)


def fit_history(item_ids: torch.Tensor, L: int) -> torch.Tensor:
    """The model's input (B, L): the last L columns, left-padded with 0 when S < L.

    Concatenate-then-slice has no branch on S, so a traced graph handles every history length. Not
    ``F.pad``: ONNX Runtime's CUDA provider has no int64 Pad kernel, so that one node ran on the CPU
    and ort-cuda-graph could not capture the graph (seen on an H200); zeros and Concat run on the GPU
    and fold into a constant once batch and history are fixed."""
    zeros = item_ids.new_zeros(item_ids.shape[0], L)  # (B, L)
    return torch.cat([zeros, item_ids], dim=1)[:, -L:]  # (B, L)


def always_excluded(num_items: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(2,) int64 ids every ranking excludes: the padding row 0 and the mask token N + 1.

    Made on ``device`` by a device-side fill (``arange``), never from host data: a host-to-device
    copy inside a forward pass breaks CUDA-graph capture (cudaErrorStreamCaptureUnsupported). The
    serving modules keep it as a buffer (``UnrolledRecommender.always_excluded``) and pass it in."""
    return torch.arange(2, device=device) * (num_items + 1)  # [0, N + 1]


def exclude_items(scores: torch.Tensor, excluded: torch.Tensor, num_items: int, value: float,
                  always: torch.Tensor | None = None) -> torch.Tensor:
    """The masking rule: ``value`` at every id of ``excluded`` (B, S) (0 entries are padding), at
    the padding row 0 and at the mask token N + 1 of ``scores`` (B, V); one scatter, out of place.

    ``always`` (2,): those two ids (``always_excluded``), a buffer of the calling module; without it
    they are made on the device of ``excluded``. Evaluation passes -inf (a seen item can never tie
    the target); serving passes ``MASK_SCORE``, finite and fp16-safe, so TopK never sees -inf and
    an all-padding history gives no NaN."""
    if always is None:
        always = always_excluded(num_items, excluded.device)
    static = always.expand(excluded.shape[0], 2)  # (B, 2)
    return scores.scatter(1, torch.cat([excluded, static], dim=1), value)  # (B, V)


@torch.no_grad()
def reference_scores(model: CDDRec, item_ids: torch.Tensor, noise: torch.Tensor | None = None,
                     plain: bool = True, steps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked scores (B, V) float32, user_embedding (B, d)) of the plain reference.

    ``noise`` (T, B, d) selects the stochastic chain with explicit noise (Eq. 4); ``plain=False``
    uses the model's hoisted last-position path instead; ``steps`` S: early exit after S of the T
    reverse steps (the reference of an ``--steps S`` graph)."""
    model.eval()
    item_ids = valid_ids(item_ids, model.cfg.num_items)  # (B, S)
    hist = fit_history(item_ids, model.cfg.max_len)
    user = model.user_embedding(hist, noise, plain=plain, steps=steps)  # (B, d)
    scores = model.scores(user).float()  # (B, V)
    return exclude_items(scores, item_ids, model.cfg.num_items, MASK_SCORE), user


def reference_topk(model: CDDRec, item_ids: torch.Tensor, k: int, noise: torch.Tensor | None = None,
                   plain: bool = True, steps: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top_items (B, K) int64, top_scores (B, K) float32, user_embedding (B, d))."""
    scores, user = reference_scores(model, item_ids, noise, plain, steps)
    top = scores.topk(k, dim=1)
    return top.indices, top.values, user


def reference_runner(model: CDDRec, steps: int | None = None):
    """The reference as a parity runner's counterpart (``cddrec.parity.compare_runners``): a feed
    {"item_ids" (B, S) int64 [, "noise" (T, B, d)]} of numpy arrays -> the masked fp32 scores of
    every item (B, V), numpy, from the plain eager model on the model's device (``steps`` S: the
    early exit after S reverse steps, as a ``--steps S`` graph runs; None: all T)."""
    device = next(model.parameters()).device

    def scores(feed: dict) -> np.ndarray:
        ids = torch.as_tensor(np.asarray(feed["item_ids"]), dtype=torch.int64, device=device)
        noise = feed.get("noise")
        noise = None if noise is None else torch.as_tensor(np.asarray(noise), device=device)
        return reference_scores(model, ids, noise, steps=steps)[0].cpu().numpy()  # (B, V)

    return scores


def popular_topk(popularity, vocab, k: int) -> list:
    """[[item key, training count], ...] of the k most interacted items (the cold-start fallback)."""
    if popularity is None:
        return []
    counts = np.asarray(popularity, dtype=np.float64)[: len(vocab) + 1].copy()
    counts[0] = -1  # padding
    ids = np.argsort(-counts, kind="stable")[:k]
    return [[vocab.key(int(i)), int(counts[i])] for i in ids if counts[i] >= 0]
