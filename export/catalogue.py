"""Two-stage top-k for large catalogues: int8 candidates, then exact fp32 rescoring.

With a million items the exact scoring MatMul streams the whole fp32 item table (512 MB at
d=128) for every batch and dominates the graph. The two-stage graph scores the user against
an int8 copy of the table (one scale per item, symmetric; the user vector quantized per batch:
com.microsoft DynamicQuantizeMatMul, VNNI on CPUs that have it), masks the excluded items,
keeps the top C candidates, and rescores those C exactly in fp32 (a Gather of C rows and a
batched MatMul) before the final top-k. The returned scores are exact fp32 scores; the
returned items differ from the exact top-k only where a true top-k item fell outside the int8
top-C (measured in ``benchmarks/results/catalogue_topk.md``). ONNX Runtime only (contrib op).

Letters: B batch, S history given, d hidden, V item rows, C candidates, K top-k.
"""

from __future__ import annotations

import torch
from torch import nn

from cddrec.contract import MASK_SCORE
from cddrec.inference import exclude_items, valid_ids

from .fusion import MS_DOMAIN


def quantize_rows(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(V, d) fp32 -> int8 (d, V) transposed and scales (V,): symmetric, one scale per row."""
    scale = table.abs().amax(1).clamp_min(1e-12) / 127.0  # (V,)
    q = (table / scale[:, None]).round().clamp(-127, 127).to(torch.int8)  # (V, d)
    return q.t().contiguous(), scale


class Int8Scores(torch.autograd.Function):
    """Approximate scores user (B, d) x int8 table (d, V) with per-row scales (V,) -> (B, V).

    The torch forward emulates ONNX Runtime's DynamicQuantizeMatMul (user quantized to uint8,
    asymmetric, one scale per tensor); the symbolic emits it."""

    @staticmethod
    def forward(ctx, user, table_q_t, scale):
        lo, hi = user.min().clamp(max=0.0), user.max().clamp(min=0.0)
        s = ((hi - lo) / 255.0).clamp_min(1e-12)
        zp = (-lo / s).round().clamp(0, 255)
        uq = ((user / s).round() + zp).clamp(0, 255) - zp  # (B, d), integers
        return (uq @ table_q_t.float()) * s * scale  # (B, V)

    @staticmethod
    def symbolic(g, user, table_q_t, scale):
        out = g.op(f"{MS_DOMAIN}::DynamicQuantizeMatMul", user, table_q_t, scale)
        return out.setType(user.type().with_sizes([None, None]))


class TwoStageTopK(nn.Module):
    """A recommender module whose top-k comes from int8 candidates rescored exactly.

    ``inner``: an ``UnrolledRecommender`` (or ``FusedRecommender``); only its user embedding is used."""

    def __init__(self, inner: nn.Module, candidates: int):
        super().__init__()
        self.inner, self.k = inner, inner.k
        table = inner.model.item_emb.weight.detach().float()  # (V, d), rescored from the model's own table
        self.C = min(candidates, table.shape[0])
        if self.C < self.k:
            raise ValueError(f"candidates ({candidates}) must be at least k ({self.k})")
        q, scale = quantize_rows(table)
        self.register_buffer("table_q_t", q)
        self.register_buffer("scale", scale)

    def forward(self, item_ids: torch.Tensor, noise: torch.Tensor | None = None):
        user = self.inner(item_ids, noise)[2] if noise is not None else self.inner(item_ids)[2]  # (B, d)
        approx = Int8Scores.apply(user, self.table_q_t, self.scale)  # (B, V)
        item_ids = valid_ids(item_ids, self.inner.model.cfg.num_items)  # (B, S): invalid ids are padding
        approx = exclude_items(approx, item_ids, self.inner.model.cfg.num_items, MASK_SCORE,
                               self.inner.always_excluded)  # the masking rule: (B, V)
        cand_scores, cand = torch.topk(approx, self.C, dim=1)  # (B, C)
        table = self.inner.model.item_emb.weight  # (V, d): the one fp32 copy in the graph
        exact = (table[cand] @ user.unsqueeze(-1)).squeeze(-1)  # (B, C, d) @ (B, d, 1) -> (B, C)
        exact = torch.where(cand_scores <= MASK_SCORE, torch.full_like(exact, MASK_SCORE), exact)  # stay excluded
        top_scores, pos = torch.topk(exact, self.k, dim=1)  # (B, K)
        return cand.gather(1, pos), top_scores, user
