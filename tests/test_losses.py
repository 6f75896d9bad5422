import pytest
import torch
import torch.nn.functional as F

from cddrec.batches import TrainBatches
from cddrec.losses import cross_divergence, info_nce, objective, self_mask
from cddrec.model import CDDRec


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
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) or "default")
def test_objective_finite_and_gradients_reach_every_parameter(tiny_configs, tiny_data, variant, open_gates):
    model_cfg, cfg, _ = tiny_configs(num_items=tiny_data.num_items, **variant)
    torch.manual_seed(0)
    model = CDDRec(model_cfg).train()
    open_gates(model)  # at 0 the gated update has no gradient
    batch = next(iter(TrainBatches(tiny_data, model_cfg.max_len, 16, seed=0)))
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
