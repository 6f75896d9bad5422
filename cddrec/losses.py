"""The training objective (paper Eq. 5-8) and its options.

    L = sum_{t=0}^{T-1} 1/(t+1) * (L_rank^t + lambda (L_in^t + L_cross^t))

L_rank^t is the cross-divergence of Eq. 5 (``loss="cd"``), a full-catalogue softmax
cross-entropy (``loss="ce"``) or a sampled softmax over the target and M shared negatives with the
logQ correction (``loss="sampled"``; ``"auto"`` picks ce or sampled by N, ``TrainConfig.resolve_loss``),
at every step (``rank_steps="all"``) or at the last step only (``rank_steps="last"``; ``"auto"``
picks by the logit columns times T, ``TrainConfig.rank_last_only``). L_in (Eq. 6) and L_cross
(Eq. 7) are exact InfoNCE terms over the batch at every step.

Each term is a mean over this batch's rows. A shard of a global batch (one process of a torchrun
job) passes ``shares``: its rows' count over the global mean count per process, so that the mean
over processes that DistributedDataParallel takes of the gradients is the gradient of the mean over
the global batch, as one process with the global batch would compute it.

Letters: B batch, L positions, n valid (non-padding) target positions in the batch,
d hidden size, N items, M sampled negatives, T steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import TrainConfig
from .model import CDDRec


def info_nce(anchor: torch.Tensor, positive: torch.Tensor, tau: float, cosine: bool = True,
             mask: torch.Tensor | None = None) -> torch.Tensor:
    """Exact InfoNCE of Eq. 6/7, averaged over rows: anchor, positive (n, d) -> scalar.

    -log exp(a_i.p_i/tau) / (sum_j exp(a_i.p_j/tau) + sum_{j != i} exp(a_i.a_j/tau))

    One (n, 2n) matmul against [positives; anchors] and a fused cross-entropy whose label is
    the positive's column; the anchor's own column is masked with -inf (``mask``: ``self_mask(n,
    anchor)``, made once by a caller that calls this at every step with the same n).
    """
    if cosine:
        anchor, positive = F.normalize(anchor, dim=-1), F.normalize(positive, dim=-1)
    n = anchor.shape[0]
    keys = torch.cat([positive, anchor])  # (2n, d)
    if mask is None:
        mask = self_mask(n, anchor)
    logits = torch.addmm(mask, anchor / tau, keys.t())  # (n, 2n)
    return F.cross_entropy(logits, torch.arange(n, device=anchor.device))


def self_mask(n: int, like: torch.Tensor) -> torch.Tensor:
    """(n, 2n) additive mask, -inf at column n + i of row i (an anchor is not its own negative).

    Added inside the matmul (addmm), so it costs no extra pass."""
    mask = torch.zeros(n, 2 * n, device=like.device, dtype=like.dtype)
    mask[:, n:].diagonal().fill_(float("-inf"))
    return mask


def cross_divergence(pos_div: torch.Tensor, neg_div: torch.Tensor) -> torch.Tensor:
    """Eq. 5 as a loss: -[log sigma(-D_pos) + log(1 - sigma(-D_neg))], averaged."""
    return (F.softplus(pos_div) + F.softplus(-neg_div)).mean()


def sampled_softmax(pred: torch.Tensor, pos_emb: torch.Tensor, neg_emb: torch.Tensor, pos_log_q: torch.Tensor,
                    neg_log_q: torch.Tensor, hits: torch.Tensor) -> torch.Tensor:
    """Sampled softmax cross-entropy with the logQ correction, averaged over rows.

    Row i's logits are its target's and the M shared samples', each minus log Q of that item (its
    expected count in the draw), a sample equal to the row's target (an accidental hit) masked:

        -log exp(o_iy - log Q_y) / (exp(o_iy - log Q_y) + sum_{j: s_j != y} exp(o_ij - log Q_j))

    pred, pos_emb (n, d): preferences and target embeddings; neg_emb (M, d); pos_log_q (n,),
    neg_log_q (M,); hits (n, M) bool. With every item as a sample once and a uniform Q (the
    correction is then a constant) it is the full-catalogue softmax CE.
    """
    pos = (pred * pos_emb).sum(-1) - pos_log_q  # (n,)
    # a hit gets the lowest finite logit, not -inf: a row whose every sample is a hit still has a finite gradient
    neg = torch.addmm(-neg_log_q, pred, neg_emb.t()).masked_fill(hits, torch.finfo(pred.dtype).min)  # (n, M)
    # log(e^pos + sum_j e^neg_j) - pos, without concatenating the target's column to the (n, M) logits
    return (torch.logaddexp(pos, torch.logsumexp(neg, 1)) - pos).mean()


@dataclass
class RankTargets:
    """What L_rank^t compares a step's preferences (n, d) with, the same at every step: the targets'
    clean embeddings x0 (n, d), the per-target negatives' x0_neg (n, d) of ``cd``, the target ids
    ``labels`` (n,) (1..N), and for ``sampled`` the shared samples' embeddings (M, d), their log Q (M,),
    the targets' log Q (n,) and the accidental hits (n, M)."""

    loss: str
    x0: torch.Tensor
    x0_neg: torch.Tensor
    labels: torch.Tensor
    sampled_emb: torch.Tensor | None = None
    sampled_log_q: torch.Tensor | None = None
    target_log_q: torch.Tensor | None = None
    hits: torch.Tensor | None = None


def rank_targets(model: CDDRec, cfg: TrainConfig, batch: dict[str, torch.Tensor]) -> RankTargets:
    """The step-independent inputs of L_rank for ``batch`` (embeddings gathered once for the T steps)."""
    table = model.item_emb.weight  # (V, d)
    targets = batch["targets"]
    valid = targets > 0  # (B, L)
    labels = targets[valid]  # (n,)
    x0, x0_neg = F.embedding(labels, table), F.embedding(batch["negatives"][valid], table)  # (n, d) each
    rt = RankTargets(cfg.resolve_loss(model.cfg)[0], x0, x0_neg, labels)
    if rt.loss == "sampled":
        ids = batch["sampled"]  # (M,)
        rt.sampled_emb, rt.sampled_log_q = F.embedding(ids, table), batch["sampled_log_q"]  # (M, d), (M,)
        rt.target_log_q = batch["target_log_q"][valid]  # (n,)
        rt.hits = ids.unsqueeze(0) == labels.unsqueeze(1)  # (n, M)
    return rt


def objective(model: CDDRec, batch: dict[str, torch.Tensor], cfg: TrainConfig,
              shares: tuple[float, float] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The full training loss of one batch under ``cfg``'s objective, and its parts (floats) for logging.

    ``shares`` (a shard of a global batch): the factors of the per-target terms and of the per-user
    term (L_cross), n / (n_global / world) and m / (m_global / world); None: plain means."""
    diff = model.diffusion
    inputs, targets = batch["input_ids"], batch["targets"]
    valid = targets > 0  # (B, L)

    B, L = inputs.shape
    rows = valid.flatten().nonzero().squeeze(1)  # (n,) flat (B, L) positions with a target
    last = (rows % L == L - 1).nonzero().squeeze(1)  # entries of ``rows`` at the last position
    e_s, bias = model.encode(inputs)  # (B, L, d)
    _, states = diff.reverse(model.decoder, e_s, bias, rows=rows, sample=cfg.denoising, return_all=True)
    use_infonce = cfg.lam > 0 and model.decoder is not None
    if use_infonce:
        e_aug, bias_aug = model.encode(batch["aug_ids"])
        _, aug_states = diff.reverse(model.decoder, e_aug, bias_aug, last_only=True, sample=cfg.denoising,
                                     return_all=True)
        aug_owner = rows[last] // L  # the user of each last-position row
        in_mask, cross_mask = self_mask(len(rows), e_s), self_mask(len(last), e_s)  # the same at every step
    rank_last_only = cfg.rank_last_only(model.cfg)
    rt = rank_targets(model, cfg, batch)
    x0 = rt.x0  # (n, d) clean target embeddings
    share_n, share_m = shares if shares is not None else (None, None)

    total = torch.zeros((), device=e_s.device)
    zero = torch.zeros((), device=e_s.device)
    parts = {"rank": zero, "in": zero, "cross": zero}  # detached tensors: one host sync at the end
    T = len(states)
    for i, x_hat in enumerate(states):
        t = T - 1 - i  # decoder step of this state
        w = 1.0 / (t + 1)
        pred = x_hat  # (n, d) generated preference (sampled, Eq. 4)
        if t > 0 and rank_last_only:
            rank = torch.zeros((), device=pred.device)
        else:
            rank = rank_term(model, cfg, pred, t, rt)
        loss_t = rank if share_n is None else rank * share_n
        parts["rank"] = parts["rank"] + w * loss_t.detach()
        if use_infonce:
            target_t = diff.q_sample(x0, t) if cfg.diffusion else x0  # x_t ~ q(x_t | x_0), Eq. 2
            l_in = info_nce(pred, target_t, cfg.temperature, cfg.infonce_cosine, in_mask)
            l_cross = info_nce(pred[last], aug_states[i][aug_owner, 0], cfg.temperature, cfg.infonce_cosine,
                               cross_mask)
            if share_n is not None:
                l_in, l_cross = l_in * share_n, l_cross * share_m
            loss_t = loss_t + cfg.lam * (l_in + l_cross)
            parts["in"] = parts["in"] + w * l_in.detach()
            parts["cross"] = parts["cross"] + w * l_cross.detach()
        total = total + w * loss_t
    parts["loss"] = total.detach()
    values = torch.stack(list(parts.values())).tolist()
    return total, dict(zip(parts, values))


def rank_term(model: CDDRec, cfg: TrainConfig, pred: torch.Tensor, t: int, rt: RankTargets) -> torch.Tensor:
    """L_rank^t of the generated preferences ``pred`` (n, d) of step t: the full-catalogue softmax (``ce``),
    the sampled softmax (``sampled``) or Eq. 5's cross-divergence against the targets and negatives (``cd``)."""
    diff = model.diffusion
    if rt.loss == "ce":
        catalogue = model.item_emb.weight[1:model.cfg.num_items + 1]  # (N, d): no padding or mask rows
        return F.cross_entropy(pred @ catalogue.t(), rt.labels - 1)  # (n, N) logits
    if rt.loss == "sampled":
        return sampled_softmax(pred, rt.x0, rt.sampled_emb, rt.target_log_q, rt.sampled_log_q, rt.hits)
    x0, x0_neg = rt.x0, rt.x0_neg
    if cfg.cd_divergence == "kl" and model.decoder is not None:
        # KL between the posterior q(x_t | x_{t+1}, x_0) and N(x_hat_t, beta_hat I), with
        # x_hat_t sampled by Eq. 4 ("we sample both ... according to Eq. 2 and Eq. 4")
        return cross_divergence(diff.step_kl(pred, x0, t, cfg.diffusion), diff.step_kl(pred, x0_neg, t, cfg.diffusion))
    # "dot": the released code's logit, -D = <x_hat, x_t>
    pos_t = diff.q_sample(x0, t) if cfg.diffusion else x0
    neg_t = diff.q_sample(x0_neg, t) if cfg.diffusion else x0_neg
    return cross_divergence(-(pred * pos_t).sum(-1), -(pred * neg_t).sum(-1))
