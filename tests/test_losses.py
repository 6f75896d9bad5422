import pytest
import torch
import torch.nn.functional as F

from cddrec.batches import TrainBatches
from cddrec.losses import cross_divergence, info_nce, objective, sampled_softmax, self_mask
from cddrec.model import CDDRec
from cddrec.sampler import ItemProposal


def first_batch(data, model_cfg, cfg, batch_size=16):
    """The first training batch of ``data``, with the sampled softmax's samples when ``cfg`` trains it."""
    proposal = None
    if cfg.resolve_loss(model_cfg)[0] == "sampled":
        proposal = ItemProposal(data.popularity("train"), cfg.negatives, cfg.negative_sampling)
    return next(iter(TrainBatches(data, model_cfg.max_len, batch_size, seed=0, proposal=proposal)))


def brute_info_nce(a, p, tau, cosine):
    if cosine:
        a, p = F.normalize(a, dim=-1), F.normalize(p, dim=-1)
    n, total = a.shape[0], 0.0
    for i in range(n):
        num = torch.exp(a[i] @ p[i] / tau)
        den = sum(torch.exp(a[i] @ p[j] / tau) for j in range(n))
        den = den + sum(torch.exp(a[i] @ a[j] / tau) for j in range(n) if j != i)
        total = total - torch.log(num / den)
    return total / n


@pytest.mark.parametrize("cosine", [True, False])
def test_info_nce_matches_brute_force(cosine):
    g = torch.Generator().manual_seed(0)
    a, p = torch.randn(9, 6, generator=g, dtype=torch.float64), torch.randn(9, 6, generator=g, dtype=torch.float64)
    assert info_nce(a, p, 0.5, cosine).item() == pytest.approx(brute_info_nce(a, p, 0.5, cosine).item(), rel=1e-10)
    assert torch.equal(info_nce(a, p, 0.5, cosine, self_mask(9, a)), info_nce(a, p, 0.5, cosine))  # a caller's mask
    # a smaller size gets its own mask
    assert info_nce(a[:4], p[:4], 0.5, cosine).item() == pytest.approx(
        brute_info_nce(a[:4], p[:4], 0.5, cosine).item(), rel=1e-10)


def test_cross_divergence_formula():
    pos, neg = torch.tensor([0.5, 2.0]), torch.tensor([3.0, 0.1])
    want = -(torch.log(torch.sigmoid(-pos)) + torch.log(1 - torch.sigmoid(-neg))).mean()
    assert cross_divergence(pos, neg).item() == pytest.approx(want.item(), rel=1e-6)


VARIANTS = [
    {},
    {"lam": 0.3, "denoising": True},
    {"decoder_norm": "post", "lam": 0.3},
    {"rank_steps": "last"},
    {"loss": "cd"},
    {"loss": "cd", "cd_divergence": "dot"},
    {"diffusion": False},
    {"denoising": False},
    {"loss": "cd", "diffusion": False, "denoising": False},
    {"infonce_cosine": False, "loss": "cd", "cd_divergence": "dot"},
    {"decoder": False, "lam": 0.0},
    {"decoder": False, "lam": 0.0, "loss": "cd", "cd_divergence": "dot"},
    {"loss": "sampled", "negatives": 8},
    {"loss": "sampled", "negatives": 8, "negative_sampling": "uniform", "lam": 0.3},
    {"loss": "auto"},
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) or "default")
def test_objective_finite_and_gradients_reach_every_parameter(tiny_configs, tiny_data, variant, open_gates):
    model_cfg, cfg, _ = tiny_configs(num_items=tiny_data.num_items, **variant)
    torch.manual_seed(0)
    model = CDDRec(model_cfg).train()
    open_gates(model)  # at 0 the gated update has no gradient
    batch = first_batch(tiny_data, model_cfg, cfg)
    loss, parts = objective(model, batch, cfg)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"no gradient reaches {name}"
        assert torch.isfinite(p.grad).all(), name
        if name != "item_emb.weight":  # row 0 (padding) is fixed, the rest must move
            assert p.grad.abs().sum() > 0, f"zero gradient for {name}"
    assert model.item_emb.weight.grad[0].abs().sum() == 0
    if variant.get("decoder", True) and cfg.lam > 0:
        assert parts["in"] > 0 and parts["cross"] > 0


def test_objective_uses_step_weights(tiny_configs, tiny_data, monkeypatch):
    """Eq. 8: the loss of step t is weighted 1/(t+1)."""
    model_cfg, cfg, _ = tiny_configs(num_items=tiny_data.num_items, lam=0.0, loss="cd", cd_divergence="dot")
    model = CDDRec(model_cfg).eval()  # no dropout
    batch = next(iter(TrainBatches(tiny_data, model_cfg.max_len, 16, seed=0)))
    calls = []
    import cddrec.losses as L

    real = L.cross_divergence

    def spy(p, n):
        out = real(p, n)
        calls.append(out.item())
        return out

    monkeypatch.setattr(L, "cross_divergence", spy)
    torch.manual_seed(1)
    loss, _ = objective(model, batch, cfg)
    T = model_cfg.steps
    assert len(calls) == T
    want = sum(c / (T - i) for i, c in enumerate(calls))  # states come t = T-1..0
    assert loss.item() == pytest.approx(want, rel=1e-5)


def brute_sampled_softmax(pred, pos_emb, neg_emb, pos_log_q, neg_log_q, labels, ids):
    """Row by row: -log of the target's share among the target and the samples that are not the target."""
    total = 0.0
    for i in range(len(pred)):
        pos = pred[i] @ pos_emb[i] - pos_log_q[i]
        negs = [pred[i] @ neg_emb[j] - neg_log_q[j] for j in range(len(ids)) if ids[j] != labels[i]]
        total = total - (pos - torch.logsumexp(torch.stack([pos, *negs]), 0))
    return total / len(pred)


def test_sampled_softmax_gradients_match_a_row_by_row_reference():
    """A tiny catalogue, popularity samples with repeats and accidental hits: value and gradients (of the
    preferences, the target and sample embeddings) equal an explicit per-row computation."""
    g = torch.Generator().manual_seed(0)
    num_items, d = 12, 5
    popularity = torch.randint(0, 9, (num_items + 2,), generator=g).numpy()
    proposal = ItemProposal(popularity, 10, "popularity")
    ids = torch.from_numpy(proposal.sample(__import__("numpy").random.default_rng(1)))  # (M,)
    labels = torch.tensor([ids[0].item(), ids[3].item(), 1, 7, 12, ids[0].item()])  # hits on rows 0, 1 and 5
    log_q = torch.from_numpy(proposal.log_q).double()
    table = torch.randn(num_items + 2, d, generator=g, dtype=torch.float64, requires_grad=True)
    pred = torch.randn(len(labels), d, generator=g, dtype=torch.float64, requires_grad=True)
    assert len(set(ids.tolist())) < len(ids) and (ids.unsqueeze(0) == labels.unsqueeze(1)).any()

    def grads(fn):
        table.grad = pred.grad = None
        loss = fn()
        loss.backward()
        return loss.detach(), pred.grad.clone(), table.grad.clone()

    got = grads(lambda: sampled_softmax(pred, table[labels], table[ids], log_q[labels], log_q[ids],
                                        ids.unsqueeze(0) == labels.unsqueeze(1)))
    want = grads(lambda: brute_sampled_softmax(pred, table[labels], table[ids], log_q[labels], log_q[ids], labels,
                                               ids.tolist()))
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    assert want[2].abs().sum() > 0


def test_sampled_softmax_over_every_item_with_a_uniform_proposal_is_the_full_softmax(tiny_configs, tiny_data):
    """With each item sampled once and Q uniform (the logQ correction a constant), the sampled softmax is the
    full-catalogue CE: in the loss function and in the whole objective (every step, every row)."""
    n_items = tiny_data.num_items
    proposal = ItemProposal(tiny_data.popularity("train"), n_items, "uniform")
    model_cfg, ce, _ = tiny_configs(num_items=n_items, dropout=0.0, attn_dropout=0.0, rank_steps="all")
    sampled = ce.replace(loss="sampled", negatives=n_items, negative_sampling="uniform")
    torch.manual_seed(0)
    model = CDDRec(model_cfg).eval()
    batch = first_batch(tiny_data, model_cfg, sampled)
    every = torch.arange(1, n_items + 1)
    batch.update(sampled=every, sampled_log_q=torch.from_numpy(proposal.log_q[1:n_items + 1]))
    assert torch.allclose(batch["sampled_log_q"], torch.zeros(n_items))  # log(M / N) = 0
    a, _ = objective(model, batch, sampled)
    b, _ = objective(model, batch, ce)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    g = torch.Generator().manual_seed(1)
    pred, table = torch.randn(7, 4, generator=g, dtype=torch.float64), torch.randn(n_items + 2, 4, generator=g,
                                                                                   dtype=torch.float64)
    labels = torch.randint(1, n_items + 1, (7,), generator=g)
    shift = torch.full((n_items + 2,), 3.7, dtype=torch.float64)  # any constant log Q cancels
    got = sampled_softmax(pred, table[labels], table[every], shift[labels], shift[every],
                          every.unsqueeze(0) == labels.unsqueeze(1))
    want = F.cross_entropy(pred @ table[1:n_items + 1].t(), labels - 1)
    assert got.item() == pytest.approx(want.item(), rel=1e-12)


def test_item_proposal_draws_by_popularity_and_holds_its_log_expected_counts():
    import numpy as np

    popularity = np.array([0, 30, 0, 9, 60, 0])  # ids 0 and 5: padding and mask
    prop = ItemProposal(popularity, 4, "popularity")
    q = np.array([31, 1, 10, 61]) / 103
    assert np.allclose(prop.log_q[1:5], np.log(4 * q)) and prop.log_q[0] == prop.log_q[5] == 0
    draws = np.concatenate([prop.sample(np.random.default_rng(s)) for s in range(3000)])
    assert draws.min() >= 1 and draws.max() <= 4
    assert np.allclose(np.bincount(draws, minlength=5)[1:] / len(draws), q, atol=0.01)
    uniform = ItemProposal(popularity, 4, "uniform")
    assert np.allclose(uniform.log_q[1:5], 0.0)
    assert set(np.concatenate([uniform.sample(np.random.default_rng(s)) for s in range(50)])) == {1, 2, 3, 4}


def test_sampled_softmax_is_finite_when_every_sample_of_a_row_is_its_target():
    pred = torch.randn(2, 3, requires_grad=True)
    table = torch.randn(5, 3)
    ids, labels = torch.tensor([2, 2]), torch.tensor([2, 3])
    loss = sampled_softmax(pred, table[labels], table[ids], torch.zeros(2), torch.zeros(2),
                           ids.unsqueeze(0) == labels.unsqueeze(1))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pred.grad).all() and pred.grad[0].abs().sum() == 0
