"""CDDRec (paper section 3): SASRec encoder, cross-attentive conditional denoising decoder.

Letters: B batch, L positions (max_len), Q query positions of the decoder (L, or 1 when only
the last position is decoded), d hidden size, H heads, h = d / H, T denoising steps,
N items, V = N + 2 rows of the item table (0 padding, 1..N items, N+1 mask token).

Inputs are left-padded with 0, so the most recent item is always at position L - 1.
Everything is per user and causal: a row never reads another row, and position i reads
items 1..i only (encoder self-attention and decoder cross-attention are both causal).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .diffusion import GaussianDiffusion
from .flops import flops_per_user  # torch-free (cddrec/flops.py): benchmarks count FLOPs without torch

NEG_INF = -1e4  # masked attention logit: finite, so fp16-safe and never NaN on all-padding rows


def attention_bias(item_ids: torch.Tensor) -> torch.Tensor:
    """Additive (B, 1, L, L) mask: key j visible to query i iff j <= i and item j is not padding."""
    B, L = item_ids.shape
    causal = torch.ones(L, L, dtype=torch.bool, device=item_ids.device).tril()  # (L, L)
    keep = causal.unsqueeze(0) & (item_ids > 0).unsqueeze(1)  # (B, L, L)
    zero = torch.zeros((), dtype=torch.float32, device=item_ids.device)
    return torch.where(keep, zero, torch.full_like(zero, NEG_INF)).unsqueeze(1)  # (B, 1, L, L)


class MultiHeadAttention(nn.Module):
    """Attention with separate query and key/value inputs; K and V can be precomputed."""

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.h = heads, d // heads
        self.q, self.kv, self.o = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(d, d)  # kv: one matmul
        self.drop = nn.Dropout(dropout)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        return x.view(B, S, self.heads, self.h).transpose(1, 2)  # (B, H, S, h)

    def memory(self, kv_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys, already transposed, and values of ``kv_in`` (B, L, d): (B, H, h, L), (B, H, L, h)."""
        k, v = self.kv(kv_in).chunk(2, dim=-1)  # (B, L, d) x2
        return self.split(k).transpose(-1, -2), self.split(v)

    def attend(self, q: torch.Tensor, kt: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Context before the output projection: q (B, Q, d) projected; kt (B, H, h, L) and
        v (B, H, L, h) from ``memory``; bias (B, 1, Q, L) -> (B, Q, d)."""
        B, Q, _ = q.shape
        # one query: (B, 1, H, h) and (B, H, 1, h) share a memory layout, so reshape, no transpose
        qh = q.reshape(B, self.heads, 1, self.h) if Q == 1 else self.split(q)  # (B, H, Q, h)
        att = qh @ kt / math.sqrt(self.h) + bias  # (B, H, Q, L)
        att = self.drop(att.softmax(-1))
        ctx = att @ v  # (B, H, Q, h)
        d = self.heads * self.h  # explicit, not -1: a batch of 0 users must reshape too
        return ctx.reshape(B, 1, d) if Q == 1 else ctx.transpose(1, 2).reshape(B, Q, d)  # (B, Q, d)

    def forward(self, x: torch.Tensor, kv_in: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        k, v = self.memory(kv_in)
        return self.o(self.attend(self.q(x), k, v, bias))


class EncoderBlock(nn.Module):
    """SASRec block (post-LN as the released code): causal self-attention, then a GELU FFN."""

    def __init__(self, d: int, heads: int, dropout: float, attn_dropout: float):
        super().__init__()
        self.attn = MultiHeadAttention(d, heads, attn_dropout)
        self.ln1, self.ln2 = nn.LayerNorm(d, eps=1e-12), nn.LayerNorm(d, eps=1e-12)
        self.ff1, self.ff2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = self.ln1(x + self.drop(self.attn(x, x, bias)))  # (B, L, d)
        return self.ln2(x + self.drop(self.ff2(F.gelu(self.ff1(x)))))  # (B, L, d)


def weight_only(lin: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x W^T without the bias, in the layer's weight dtype (fp16 layers of the fp16 graph) and back."""
    w = lin.weight
    return F.linear(x, w) if w.dtype == x.dtype else F.linear(x.to(w.dtype), w).to(x.dtype)


class DenoisingDecoder(nn.Module):
    """Cross-attentive conditional denoising decoder (Eq. 3), one step of the reverse chain.

    Eq. 3 queries the encoded history e_s with the step embedding e_t; here the query also
    carries the state generated at the previous step, which makes the T steps a real chain:

        CA(q, e_s) = Softmax(q W_Q (e_s W_K)^T / sqrt(h_dim)) (e_s W_V)   over visible positions
        pre:    q = LN(x_hat_{t+1}) + e_t,  mu_t = x_hat_{t+1} + W_O CA(q, e_s)
        rezero: q = LN(x_hat_{t+1}) + e_t,  mu_t = x_hat_{t+1} + g_t W_O CA(q, e_s), g_t learned, 0 at init
        post:   q = x_hat_{t+1} + e_t,      mu_t = LN(q + W_O CA(q, e_s))

    "pre" and "rezero" keep an un-normalized residual path from e_s through all T steps (with
    "rezero" the chain starts as the identity, so training starts from the plain SASRec
    prediction and the decoder refines it); "post" normalizes after every step. In all three the
    step's query projection W_Q e_t is a constant.
    """

    def __init__(self, d: int, heads: int, steps: int, attn_dropout: float, dropout: float, norm: str = "pre"):
        super().__init__()
        self.step_emb = nn.Embedding(steps, d)
        self.attn = MultiHeadAttention(d, heads, attn_dropout)
        self.ln = nn.LayerNorm(d, eps=1e-12)
        self.drop = nn.Dropout(dropout)
        self.norm = norm
        # rezero: a learned gate per step, 0 at the start, so the chain starts as the identity
        self.gate = nn.Parameter(torch.zeros(steps)) if norm == "rezero" else None

    def memory(self, e_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the encoded history e_s (B, L, d) for every step (``attn.memory``): what
        ``GaussianDiffusion.reverse`` asks each step driver for (the fused graph's has another layout)."""
        return self.attn.memory(e_s)

    def step_queries(self) -> torch.Tensor:
        """W_Q e_t + b_Q for every step (T, d): the step's share of the query, the same for every
        user, so the fast paths compute it once (the exported graph stores it as a constant)."""
        q = self.attn.q
        bias = q.bias.float() if q.bias is not None else 0.0
        return self.step_emb.weight.float() @ q.weight.float().t() + bias  # (T, d)

    def forward(self, x: torch.Tensor, t: int, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                rows: torch.Tensor | None = None, step_q: torch.Tensor | None = None) -> torch.Tensor:
        """One step of the reverse chain: state x from step t+1 -> mean mu_t, same shape.

        The only implementation of the step: the training path, the plain reference, the hoisted
        path and the exported graph all run it. x (B, Q, d) with bias (B, 1, Q, L); or, with
        ``rows`` (n,) flat positions of the (B, L) grid, x (n, d) and bias (B, 1, L, L): projections
        and LayerNorm run on the n rows only, the attention on the grid. k, v: (B, H, h, L),
        (B, H, L, h) from ``attn.memory(e_s)``. ``step_q`` (T, d) from ``step_queries()`` replaces
        the projection of e_t and the bias by a lookup: W_Q (base + e_t) + b_Q = W_Q base + step_q[t].
        """
        base = x if self.norm == "post" else self.ln(x)  # (B, Q, d) | (n, d)
        e_t = self.step_emb.weight[t]  # (d,)
        q = self.attn.q(base + e_t) if step_q is None else weight_only(self.attn.q, base) + step_q[t]  # (.., d)
        if rows is None:
            ctx = self.attn.attend(q, k, v, bias)  # (B, Q, d)
        else:
            B, _, _, L = k.shape
            grid = q.new_zeros(B * L, q.shape[-1]).index_copy(0, rows, q)  # (B*L, d)
            ctx = self.attn.attend(grid.view(B, L, q.shape[-1]), k, v, bias).reshape(B * L, q.shape[-1])[rows]  # (n, d)
        out = self.drop(self.attn.o(ctx))
        if self.norm == "post":
            return self.ln(base + e_t + out)
        return x + (out if self.gate is None else self.gate[t] * out)


class CDDRec(nn.Module):
    """The network: SASRec encoder, denoising decoder (None for the SASRec baseline) and the diffusion
    process that runs the decoder's reverse chain; built from its ``ModelConfig`` alone."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.num_items < 1:
            raise ValueError("config.num_items must be set (>= 1) before building a model")
        self.cfg = cfg
        d = cfg.hidden_size
        self.item_emb = nn.Embedding(cfg.num_rows, d, padding_idx=0)  # (V, d)
        self.pos_emb = nn.Embedding(cfg.max_len, d)
        self.emb_ln = nn.LayerNorm(d, eps=1e-12)
        self.emb_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            EncoderBlock(d, cfg.num_heads, cfg.dropout, cfg.attn_dropout) for _ in range(cfg.num_layers))
        self.decoder = (DenoisingDecoder(d, cfg.num_heads, cfg.steps, cfg.attn_dropout, cfg.dropout, cfg.decoder_norm)
                        if cfg.decoder else None)
        self.diffusion = GaussianDiffusion(cfg.steps, cfg.beta_1, cfg.beta_T)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            with torch.no_grad():
                m.weight[m.padding_idx].zero_()

    @property
    def steps(self) -> int:
        return self.cfg.decoder_steps

    # ------------------------------------------------------------------ encoder
    def encode(self, item_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SASRec: item_ids (B, L) -> e_s (B, L, d) and the attention bias (B, 1, L, L)."""
        B, L = item_ids.shape
        pos = torch.arange(L, device=item_ids.device)
        x = self.emb_drop(self.emb_ln(self.item_emb(item_ids) + self.pos_emb(pos)))  # (B, L, d)
        bias = attention_bias(item_ids)
        for block in self.blocks:
            x = block(x, bias)
        return x, bias

    def user_embedding(self, item_ids: torch.Tensor, noise: torch.Tensor | None = None,
                       plain: bool = False, steps: int | None = None) -> torch.Tensor:
        """Preference x_hat_0 at the last position (B, d): deterministic, or with explicit ``noise``
        (T, B, d). ``plain`` runs the plain reference (every position, keys and values projected at
        every step) instead of the hoisted last-position path; both give the same result. ``steps``
        S: early exit, the state x_hat_{T-S} after the first S reverse steps (None: all T)."""
        e_s, bias = self.encode(item_ids)  # (B, L, d), (B, 1, L, L)
        if not plain:
            x, _ = self.diffusion.reverse(self.decoder, e_s, bias, last_only=True, steps=steps,
                                          noise=None if noise is None else noise.unsqueeze(2))  # (B, 1, d)
            return x[:, 0]
        if noise is not None:  # positions do not interact in the decoder: noise the last one only
            full = noise.new_zeros(noise.shape[0], noise.shape[1], item_ids.shape[1], noise.shape[2])  # (T, B, L, d)
            full[:, :, -1] = noise
            noise = full
        x, _ = self.diffusion.reverse(self.decoder, e_s, bias, hoist=False, noise=noise, steps=steps)  # (B, L, d)
        return x[:, -1]

    def scores(self, user_emb: torch.Tensor) -> torch.Tensor:
        """Dot-product scores against every row of the item table: (B, d) -> (B, V).

        ``F.linear`` exports as one Gemm (transB) on the table itself, so a graph stores the table
        once (a ``@ weight.t()`` would constant-fold into a second, transposed copy)."""
        return F.linear(user_emb, self.item_emb.weight.to(user_emb.dtype))  # (B, V)

    def forward(self, item_ids: torch.Tensor, noise: torch.Tensor | None = None, steps: int | None = None) -> torch.Tensor:
        """item_ids (B, L) -> scores (B, V) of the last position (no masking); ``steps``: early exit."""
        return self.scores(self.user_embedding(item_ids, noise, steps=steps))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_user(self, plain: bool = False, steps: int | None = None) -> dict[str, float]:
        """FLOPs of one user's recommendation (see ``flops_per_user``; ``steps``: early exit after S steps)."""
        return flops_per_user(self.cfg, plain, steps)
