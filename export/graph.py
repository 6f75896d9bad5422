"""The exportable recommender: the T-step reverse chain unrolled, scoring, masking, top-k.

Work that does not change across the T steps is done once: the SASRec encoder, the
decoder's key/value projections of the history, and the step-embedding query projections
W_Q e_t, which become constants. Only the last position is decoded. The Python loop over the
steps is unrolled when traced, so the graph has no Loop op and no random op: the stochastic
graph takes its noise as an input.

Letters: B batch, S history given, L model length, d hidden, T steps, V = N + 2 rows, K top-k.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from cddrec.inference import MASK_SCORE, fit_history
from cddrec.model import CDDRec


class HalfLinear(nn.Module):
    """A Linear whose matmul runs in fp16 while its input and output stay fp32."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.weight = nn.Parameter(lin.weight.detach().half(), requires_grad=False)
        self.bias = None if lin.bias is None else nn.Parameter(lin.bias.detach().half(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.half(), self.weight, self.bias).float()


def half_linears(model: CDDRec) -> CDDRec:
    """A copy whose Linear layers compute in fp16; LayerNorm, softmax and scoring stay fp32."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, HalfLinear(child))
    return model


def _matmul(lin: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x W^T without the bias, for a Linear or a HalfLinear."""
    if isinstance(lin, HalfLinear):
        return F.linear(x.half(), lin.weight).float()
    return F.linear(x, lin.weight)


class UnrolledRecommender(nn.Module):
    """item_ids (B, S) [, noise (T, B, d)] -> top_items (B, K), top_scores (B, K), user_embedding (B, d)."""

    def __init__(self, model: CDDRec, k: int, stochastic: bool = False, fp16: bool = False):
        super().__init__()
        cfg = model.cfg
        if k < 1 or k > cfg.num_items:
            raise ValueError(f"k must be between 1 and the number of items ({cfg.num_items}), got {k}")
        model = model.eval()
        self.model = half_linears(model) if fp16 else model
        self.k, self.stochastic = k, stochastic
        self.L, self.N, self.T = cfg.max_len, cfg.num_items, model.steps
        dec = model.decoder
        with torch.no_grad():
            if dec is not None:
                e = dec.step_emb.weight.detach().float()  # (T, d)
                self.register_buffer("step_e", e.clone())
                q = dec.attn.q
                bias_q = q.bias.detach().float() if q.bias is not None else torch.zeros(e.shape[1])
                self.register_buffer("step_q", e @ q.weight.detach().float().t() + bias_q)  # W_Q e_t + b_Q: (T, d)
                self.register_buffer("step_std", model.diffusion.posterior_std[1:].clone())  # (T,)
            self.register_buffer("static_ids", torch.tensor([[0, cfg.num_items + 1]]))  # padding, mask token

    def forward(self, item_ids: torch.Tensor, noise: torch.Tensor | None = None):
        m = self.model
        hist = fit_history(item_ids, self.L)
        e_s, bias = m.encode(hist)  # (B, L, d), (B, 1, L, L)
        x = e_s[:, -1:]  # (B, 1, d): x_hat_T, the last position only
        if m.decoder is not None:
            attn = m.decoder.attn
            k, v = attn.memory(e_s)  # (B, H, h, L), (B, H, L, h): once for all T steps
            b = bias[:, :, -1:]  # (B, 1, 1, L)
            dec = m.decoder
            for t in reversed(range(self.T)):  # unrolled when traced
                base = x if dec.norm == "post" else dec.ln(x)
                q = _matmul(attn.q, base) + self.step_q[t]  # = W_Q (base + e_t) + b_Q: W_Q e_t + b_Q is constant
                x = dec.update(x, base + self.step_e[t], attn.attend(q, k, v, b), t)  # mu_t: (B, 1, d)
                if self.stochastic and t > 0:
                    x = x + self.step_std[t] * noise[t].unsqueeze(1)
        user = x[:, 0]  # (B, d)
        scores = user @ m.item_emb.weight.float().t()  # (B, V), fp32 scoring
        excluded = torch.cat([item_ids, self.static_ids.expand(item_ids.shape[0], 2)], dim=1)  # (B, S + 2)
        scores = scores.scatter(1, excluded, MASK_SCORE)  # one ScatterElements: history, padding, mask token
        top_scores, top_items = torch.topk(scores, self.k, dim=1)
        return top_items, top_scores, user
