"""The fused CPU graph: the recommender with ONNX Runtime contrib ops (com.microsoft) emitted by the exporter.

ONNX Runtime's own fusions find little in the traced graph: its CPU level-2 passes give one
BiasGelu and MatMul+scale fusions, and the transformer optimizer
(``onnxruntime.transformers.optimizer``, model type bert) adds SkipLayerNormalization but no
attention fusion (the query and key/value projections are separate, the keys pre-transposed),
and measured slower (``benchmarks/results/fusion.md``). So the fused graph is written by
the exporter: each fused piece is a ``torch.autograd.Function`` whose ``forward`` is the plain
torch computation (the module runs and is tested in torch) and whose ``symbolic`` emits the
contrib op when traced:

- encoder self-attention: one ``Attention`` (Q, K, V projections packed into one (d, 3d)
  weight, head split, scaled softmax with the additive causal/padding bias, head merge);
- encoder Add + LayerNorm pairs: ``SkipLayerNormalization`` (bias of the preceding Linear
  folded in); FFN: MatMul + ``BiasGelu``;
- decoder keys/values: projected and put in (B, H, L, h) once;
- each of the T decoder steps (``FusedStep``, driven by the one reverse chain,
  ``GaussianDiffusion.reverse``, so early exit and noise work as in the standard graph):
  ``MultiHeadAttention`` on those keys/values (no per-step transpose), and the state update
  x + g_t (W_O ctx + b_O) followed by the next step's LayerNorm as one ``SkipLayerNormalization``
  whose fourth output is the new state (the gate g_t is folded into a per-step copy of W_O, a
  constant). Steps: 5 ops instead of 13.

The graph needs ONNX Runtime (CPU or CUDA); TensorRT and other runtimes want the standard-op
graph, which stays the default export. Deterministic and stochastic chains; fp32 only.

Letters: B batch, S history given, L model length, d hidden, H heads, h = d / H, T steps,
V = N + 2 rows, K top-k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cddrec.model import CDDRec, attention_bias

from .graph import UnrolledRecommender

MS_DOMAIN = "com.microsoft"


def _none(g):
    """An omitted optional input of an ONNX node ("" in the node's input list)."""
    from torch.onnx import symbolic_helper

    return symbolic_helper._optional_input_placeholder_tensor(g)


class SkipLayerNorm(torch.autograd.Function):
    """(LN(x + skip + bias), x + skip + bias): com.microsoft SkipLayerNormalization, outputs 0 and 3."""

    @staticmethod
    def forward(ctx, x, skip, gamma, beta, bias, eps: float):
        s = x + skip + bias  # (B, Q, d)
        return F.layer_norm(s, s.shape[-1:], gamma, beta, eps), s

    @staticmethod
    def symbolic(g, x, skip, gamma, beta, bias, eps: float):
        out = g.op(f"{MS_DOMAIN}::SkipLayerNormalization", x, skip, gamma, beta, bias, epsilon_f=eps, outputs=4)
        out[0].setType(x.type())
        out[3].setType(x.type())
        return out[0], out[3]


class BiasGelu(torch.autograd.Function):
    """gelu(x + bias) (erf form): com.microsoft BiasGelu."""

    @staticmethod
    def forward(ctx, x, bias):
        return F.gelu(x + bias)

    @staticmethod
    def symbolic(g, x, bias):
        return g.op(f"{MS_DOMAIN}::BiasGelu", x, bias).setType(x.type())


class SelfAttention(torch.autograd.Function):
    """Multi-head self-attention before the output projection: com.microsoft Attention.

    x (B, L, d), w (d, 3d) = [W_Q^T | W_K^T | W_V^T], b (3d,), bias (B, 1, L, L) additive -> (B, L, d)."""

    @staticmethod
    def forward(ctx, x, w, b, bias, heads: int):
        B, L, d3 = x.shape[0], x.shape[1], w.shape[1]
        h = d3 // 3 // heads
        qkv = (x @ w + b).view(B, L, 3, heads, h).permute(2, 0, 3, 1, 4)  # (3, B, H, L, h)
        att = (qkv[0] @ qkv[1].transpose(-1, -2) / h**0.5 + bias).softmax(-1)  # (B, H, L, L)
        return (att @ qkv[2]).transpose(1, 2).reshape(B, L, -1)  # (B, L, d)

    @staticmethod
    def symbolic(g, x, w, b, bias, heads: int):
        out = g.op(f"{MS_DOMAIN}::Attention", x, w, b, _none(g), _none(g), bias, num_heads_i=heads)
        return out.setType(x.type())


class CrossAttention(torch.autograd.Function):
    """Multi-head attention of projected queries on precomputed keys/values: com.microsoft MultiHeadAttention.

    q (B, Q, d), k and v (B, H, L, h), bias (B, 1, Q, L) additive -> (B, Q, d)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, heads: int):
        B, Q, _ = q.shape
        h = k.shape[-1]
        qh = q.view(B, Q, heads, h).transpose(1, 2)  # (B, H, Q, h)
        att = (qh @ k.transpose(-1, -2) / h**0.5 + bias).softmax(-1)  # (B, H, Q, L)
        return (att @ v).transpose(1, 2).reshape(B, Q, -1)  # (B, Q, d)

    @staticmethod
    def symbolic(g, q, k, v, bias, heads: int):
        out = g.op(f"{MS_DOMAIN}::MultiHeadAttention", q, k, v, _none(g), _none(g), bias, num_heads_i=heads)
        return out.setType(q.type())


FUSIONS = ("attention", "cross_attention", "bias_gelu", "skip_layer_norm")
# measured on the development CPU (benchmarks/results/fusion.md): ONNX Runtime 1.32's CPU
# SkipLayerNormalization is several times slower than Add + LayerNormalization, so it is off
DEFAULT_FUSIONS = ("attention", "cross_attention", "bias_gelu")


def add_ln(x, skip, ln: nn.LayerNorm, bias, fused: bool):
    """(LN(x + skip + bias), x + skip + bias): one SkipLayerNormalization (``fused``) or Add + LayerNormalization."""
    if fused:
        return SkipLayerNorm.apply(x, skip, ln.weight, ln.bias, bias, ln.eps)
    s = x + (skip + bias)
    return ln(s), s


class FusedStep(nn.Module):
    """One reverse step of the decoder written with fused ops: what ``GaussianDiffusion.reverse`` drives
    in the fused graph, in place of ``DenoisingDecoder`` (same call, same result), so the chain, its
    early exit and its noise stay the one implementation.

    ``memory``: keys and values projected once; (B, H, L, h) each for ``MultiHeadAttention``
    (``cross_attention``), else the decoder's own layout. ``forward``: x (B, 1, d) -> mu_t (B, 1, d):
    the query W_Q LN(x) + step_q[t], the attention, g_t (W_O ctx + b_O) with the gate folded into a
    per-step copy of W_O, and the update. With ``skip_layer_norm`` (deterministic pre/rezero chains)
    the update and the next step's LayerNorm are one ``SkipLayerNormalization``: the step keeps that
    LayerNorm and the next step uses it when it is handed the same state (``_carry``)."""

    def __init__(self, decoder, fusions: frozenset, stochastic: bool):
        super().__init__()
        self.dec, self.T = decoder, decoder.step_emb.num_embeddings
        self.mha, self.skip_ln = "cross_attention" in fusions, "skip_layer_norm" in fusions
        self.merge_ln = self.skip_ln and not stochastic and decoder.norm != "post"
        self._carry: tuple | None = None  # (state, LN(state)) from the step before
        with torch.no_grad():
            self.register_buffer("step_e", decoder.step_emb.weight.detach().clone())  # (T, d)
            gate = decoder.gate.detach() if decoder.gate is not None else torch.ones(self.T)  # (T,)
            w_o = decoder.attn.o.weight.detach().t()  # (d, d): x @ w_o = W_O x
            self.register_buffer("step_wo", gate.view(-1, 1, 1) * w_o)  # (T, d, d): g_t W_O
            self.register_buffer("step_bo", gate.view(-1, 1) * decoder.attn.o.bias.detach())  # (T, d): g_t b_O

    def memory(self, e_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attn = self.dec.attn
        self._carry = None  # a new chain
        if not self.mha:
            return attn.memory(e_s)  # (B, H, h, L), (B, H, L, h)
        B, L = e_s.shape[0], e_s.shape[1]
        kv = attn.kv(e_s).view(B, L, 2, attn.heads, attn.h).permute(2, 0, 3, 1, 4)  # (2, B, H, L, h): once
        return kv[0], kv[1]  # (B, H, L, h) each

    def forward(self, x, t: int, k, v, bias, rows=None, step_q=None):
        dec, attn = self.dec, self.dec.attn
        post = dec.norm == "post"
        carried = self._carry
        self._carry = None
        if post:
            base = x  # (B, 1, d)
        else:
            base = carried[1] if carried is not None and carried[0] is x else dec.ln(x)  # (B, 1, d)
        q = F.linear(base, attn.q.weight) + step_q[t]  # W_Q (base + e_t) + b_Q: (B, 1, d)
        ctx = CrossAttention.apply(q, k, v, bias, attn.heads) if self.mha else attn.attend(q, k, v, bias)  # (B, 1, d)
        out = ctx @ self.step_wo[t]  # g_t W_O ctx: (B, 1, d)
        if post:  # mu_t = LN(x + e_t + W_O ctx + b_O)
            return add_ln(x + self.step_e[t], out, dec.ln, self.step_bo[t], self.skip_ln)[0]
        if self.merge_ln:  # mu_t = x + g_t (W_O ctx + b_O), and LN(mu_t) for the next step, in one op
            ln_mu, mu = add_ln(x, out, dec.ln, self.step_bo[t], True)
            self._carry = (mu, ln_mu)
            return mu
        return x + (out + self.step_bo[t])  # (B, 1, d)


class FusedRecommender(UnrolledRecommender):
    """The unrolled recommender written with fused ops (any subset of ``FUSIONS``); same inputs,
    outputs and results as ``UnrolledRecommender`` (``steps``: early exit, as there)."""

    def __init__(self, model: CDDRec, k: int, stochastic: bool = False, fusions=DEFAULT_FUSIONS,
                 steps: int | None = None):
        super().__init__(model, k, stochastic=stochastic, steps=steps)
        unknown = set(fusions) - set(FUSIONS)
        if unknown:
            raise ValueError(f"unknown fusions {sorted(unknown)}; choose from {FUSIONS}")
        self.fusions = frozenset(fusions)
        m = self.model
        with torch.no_grad():
            for i, blk in enumerate(m.blocks):
                a = blk.attn
                self.register_buffer(f"qkv_w{i}", torch.cat([a.q.weight, a.kv.weight]).t().contiguous())  # (d, 3d)
                self.register_buffer(f"qkv_b{i}", torch.cat([a.q.bias, a.kv.bias]))  # (3d,)
        self.step = FusedStep(m.decoder, self.fusions, stochastic) if m.decoder is not None else None

    def chain_decoder(self) -> nn.Module | None:
        return self.step

    def _add_ln(self, x, skip, ln: nn.LayerNorm, bias):
        return add_ln(x, skip, ln, bias, "skip_layer_norm" in self.fusions)

    def encode(self, hist: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SASRec with fused ops: hist (B, L) -> e_s (B, L, d), bias (B, 1, L, L)."""
        m = self.model
        L = hist.shape[1]
        bias = attention_bias(hist)  # (B, 1, L, L)
        x = m.emb_ln(m.item_emb(hist) + m.pos_emb.weight[:L])  # (B, L, d)
        for i, blk in enumerate(m.blocks):
            a = blk.attn
            if "attention" in self.fusions:
                ctx = SelfAttention.apply(x, getattr(self, f"qkv_w{i}"), getattr(self, f"qkv_b{i}"), bias,
                                          a.heads)  # (B, L, d)
            else:
                kt, v = a.memory(x)
                ctx = a.attend(a.q(x), kt, v, bias)  # (B, L, d)
            x, _ = self._add_ln(x, F.linear(ctx, a.o.weight), blk.ln1, a.o.bias)
            if "bias_gelu" in self.fusions:
                hidden = BiasGelu.apply(F.linear(x, blk.ff1.weight), blk.ff1.bias)  # (B, L, 4d)
            else:
                hidden = F.gelu(blk.ff1(x))
            x, _ = self._add_ln(x, F.linear(hidden, blk.ff2.weight), blk.ln2, blk.ff2.bias)
        return x, bias
