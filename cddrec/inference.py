"""The plain PyTorch reference for serving: top-k with seen-item masking.

Every fast path (the exported ONNX graph, TensorRT engines, the model's hoisted
last-position path) is checked against ``reference_topk``: the plain eager model, its Python
loop over the T steps decoding every position and projecting the history at every step.

``item_ids`` (B, S), S >= 1, left-padded with 0: the most recent L items feed the model and
all S are excluded from the ranking, together with the padding row and the mask token.
Excluded items get ``MASK_SCORE``, a large finite negative that fp16 can represent, so a
history of padding only never produces NaN and TopK never sees -inf.

Letters: B batch, S history length given, L model length, V = N + 2 item rows, K top-k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .model import CDDRec

MASK_SCORE = -30000.0


def fit_history(item_ids: torch.Tensor, L: int) -> torch.Tensor:
    """The model's input (B, L): the last L columns, left-padded with 0 when S < L.

    Pad-then-slice has no branch on S, so a traced graph handles every history length."""
    return F.pad(item_ids, (L, 0))[:, -L:]


def exclusion_mask(item_ids: torch.Tensor, num_items: int) -> torch.Tensor:
    """(B, V) bool: the history items, padding (0) and the mask token (N + 1)."""
    B = item_ids.shape[0]
    seen = torch.zeros(B, num_items + 2, dtype=torch.bool, device=item_ids.device)
    seen.scatter_(1, item_ids, True)
    seen[:, 0] = True
    seen[:, num_items + 1] = True
    return seen


@torch.no_grad()
def reference_scores(model: CDDRec, item_ids: torch.Tensor, noise: torch.Tensor | None = None,
                     plain: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked scores (B, V) float32, user_embedding (B, d)) of the plain reference.

    ``noise`` (T, B, d) selects the stochastic chain with explicit noise (Eq. 4); ``plain=False``
    uses the model's hoisted last-position path instead."""
    model.eval()
    hist = fit_history(item_ids, model.cfg.max_len)
    user = model.user_embedding(hist, noise, plain=plain)  # (B, d)
    scores = model.scores(user).float()  # (B, V)
    return scores.masked_fill(exclusion_mask(item_ids, model.cfg.num_items), MASK_SCORE), user


def reference_topk(model: CDDRec, item_ids: torch.Tensor, k: int, noise: torch.Tensor | None = None,
                   plain: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top_items (B, K) int64, top_scores (B, K) float32, user_embedding (B, d))."""
    scores, user = reference_scores(model, item_ids, noise, plain)
    top = scores.topk(k, dim=1)
    return top.indices, top.values, user


def popular_topk(popularity: torch.Tensor | None, vocab, k: int) -> list:
    """[[item key, training count], ...] of the k most interacted items (the cold-start fallback)."""
    if popularity is None:
        return []
    counts = torch.as_tensor(popularity, dtype=torch.float64).clone()
    counts[0] = -1  # padding
    counts[len(vocab) + 1:] = -1  # mask token
    ids = torch.argsort(-counts, stable=True)[:k]
    return [[vocab.key(int(i)), int(popularity[i])] for i in ids if counts[i] >= 0]
