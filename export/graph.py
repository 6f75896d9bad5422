"""The exportable recommender: the T-step reverse chain unrolled, scoring, masking, top-k.

With ``steps`` S (``cddrec-export --steps S``, early exit) only the first S reverse steps are
unrolled (``GaussianDiffusion.timesteps``) and the graph serves the state x_hat_{T-S}.

Work that does not change across the T steps is done once: the SASRec encoder, the
decoder's key/value projections of the history, and the step-embedding query projections
W_Q e_t, which become constants. Only the last position is decoded. The chain is the model's
own ``reverse`` (the one implementation of the step); its Python loop over the steps is
unrolled when traced, so the graph has no Loop op and no random op: the stochastic graph takes
its noise as an input. Masking is ``cddrec.inference.exclude_items``, the one masking rule.

The forward pass makes no tensor from host data: constants are registered buffers (the step
queries, the two always-excluded ids), so ``.to(device)`` moves them and CUDA-graph capture,
which forbids host-to-device copies, records the whole forward (``tests/test_gpu_serving.py``
traces it for ``lift_fresh``/host copies).

Letters: B batch, S history given, L model length, d hidden, T steps, V = N + 2 rows, K top-k.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from cddrec.contract import MASK_SCORE
from cddrec.inference import always_excluded, exclude_items, fit_history, valid_ids
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


class UnrolledRecommender(nn.Module):
    """item_ids (B, S) [, noise (T, B, d)] -> top_items (B, K), top_scores (B, K), user_embedding (B, d).

    ``steps``: early exit after that many reverse steps (None: all T). Subclasses (the fused graph)
    change how the history is encoded (``encode``) and what drives each step (``chain_decoder``);
    the chain itself is always ``GaussianDiffusion.reverse``."""

    def __init__(self, model: CDDRec, k: int, stochastic: bool = False, fp16: bool = False,
                 steps: int | None = None):
        super().__init__()
        cfg = model.cfg
        if k < 1 or k > cfg.num_items:
            raise ValueError(f"k must be between 1 and the number of items ({cfg.num_items}), got {k}")
        if steps is not None and model.decoder is None:
            raise ValueError("steps (early exit) needs a model with a decoder")
        if steps is not None:
            model.diffusion.timesteps(steps)  # 1 <= S <= T, or a ValueError now rather than at trace time
        model = model.eval()
        self.model = half_linears(model) if fp16 else model
        self.k, self.stochastic, self.steps_run = k, stochastic, steps
        # ids 0 and N + 1, excluded from every ranking: a buffer, not a tensor made in forward
        self.register_buffer("always_excluded", always_excluded(cfg.num_items), persistent=False)  # (2,)
        if self.model.decoder is not None:  # W_Q e_t + b_Q: constants of the graph, not computed in it
            with torch.no_grad():
                self.register_buffer("step_q", self.model.decoder.step_queries().detach().clone())  # (T, d)
        else:
            self.step_q = None

    def forward(self, item_ids: torch.Tensor, noise: torch.Tensor | None = None):
        m = self.model
        item_ids = valid_ids(item_ids, m.cfg.num_items)  # (B, S): invalid ids are padding
        e_s, bias = self.encode(fit_history(item_ids, m.cfg.max_len))  # (B, L, d), (B, 1, L, L)
        chain_noise = noise.unsqueeze(2) if self.stochastic else None  # (T, B, 1, d)
        x, _ = m.diffusion.reverse(self.chain_decoder(), e_s, bias, last_only=True, noise=chain_noise,
                                   step_q=self.step_q, steps=self.steps_run)  # (B, 1, d): x_hat_0 (x_hat_{T-S})
        return self.rank(x[:, 0], item_ids)

    def encode(self, hist: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder: hist (B, L) -> e_s (B, L, d), bias (B, 1, L, L)."""
        return self.model.encode(hist)

    def chain_decoder(self) -> nn.Module | None:
        """What ``GaussianDiffusion.reverse`` runs at each step: the model's decoder (None: SASRec)."""
        return self.model.decoder

    def rank(self, user: torch.Tensor, item_ids: torch.Tensor):
        """The graph's tail, shared by every variant: fp32 scoring of the user embedding (B, d), the
        masking rule on the (valid) history (B, S), top-k."""
        m = self.model
        scores = m.scores(user.float())  # (B, V)
        scores = exclude_items(scores, item_ids, m.cfg.num_items, MASK_SCORE, self.always_excluded)  # (B, V)
        top_scores, top_items = torch.topk(scores, self.k, dim=1)
        return top_items, top_scores, user
