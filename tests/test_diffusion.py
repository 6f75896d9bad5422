import numpy as np
import pytest
import torch

from cddrec.diffusion import GaussianDiffusion


@pytest.mark.parametrize("T,b1,bT", [(4, 1e-4, 0.04), (20, 1e-4, 0.002), (30, 1e-4, 0.1), (1, 0.01, 0.01)])
def test_schedule_matches_closed_forms(T, b1, bT):
    d = GaussianDiffusion(T, b1, bT)
    betas = np.concatenate([[0.0], np.linspace(b1, bT, T)])
    # q(x_t | x_0) by chaining q(x_t | x_{t-1}) = N(sqrt(1 - b_t) x_{t-1}, b_t): mean coef m, var v
    m, v = 1.0, 0.0
    for t in range(1, T + 1):
        m, v = m * np.sqrt(1 - betas[t]), v * (1 - betas[t]) + betas[t]
        assert d.sqrt_alphas_cumprod[t].item() == pytest.approx(m, rel=1e-6)
        assert d.sqrt_one_minus_alphas_cumprod[t].item() ** 2 == pytest.approx(v, rel=1e-5)
        # posterior q(x_{t-1} | x_t, x_0) by Gaussian conditioning of the joint of (x_{t-1}, x_t):
        # x_{t-1} = a x0 + e1 (var p), x_t = sqrt(1-b_t) x_{t-1} + e2 (var b_t)
        a_prev = np.prod(1 - betas[1:t])
        p = 1 - a_prev
        k = np.sqrt(1 - betas[t])
        gain = p * k / (k * k * p + betas[t])  # Cov(x_{t-1}, x_t) / Var(x_t)
        post_var = p - gain * k * p
        c2 = gain
        c1 = np.sqrt(a_prev) - gain * k * np.sqrt(a_prev)
        assert d.posterior_std[t].item() ** 2 == pytest.approx(post_var, abs=1e-9, rel=1e-5)
        assert d.posterior_mean_coef1[t].item() == pytest.approx(c1, abs=1e-7, rel=1e-5)
        assert d.posterior_mean_coef2[t].item() == pytest.approx(c2, abs=1e-7, rel=1e-5)
    assert all(getattr(d, n).dtype == torch.float32 for n, _ in d.named_buffers())
    assert d.step_std(0).item() == 0.0  # the last reverse step adds no noise
    assert d.posterior_variance_clipped[1].item() > 0  # clipped for the KL at t = 0


def test_q_sample_statistics():
    d = GaussianDiffusion(10, 1e-4, 0.2)
    x0 = torch.full((20000, 4), 2.0)
    torch.manual_seed(0)
    xt = d.q_sample(x0, 7)
    assert xt.mean().item() == pytest.approx(2.0 * d.sqrt_alphas_cumprod[7].item(), abs=0.02)
    assert xt.var().item() == pytest.approx(d.sqrt_one_minus_alphas_cumprod[7].item() ** 2, rel=0.03)
    assert torch.equal(d.q_sample(x0, 0), x0)


def test_step_kl_is_gaussian_kl():
    d = GaussianDiffusion(5, 1e-3, 0.05)
    x0, pred, noise = torch.randn(3, 8), torch.randn(3, 8), torch.randn(3, 8)
    t = 2
    kl = d.step_kl(pred, x0, t, noise=noise)
    x_next = d.sqrt_alphas_cumprod[t + 1] * x0 + d.sqrt_one_minus_alphas_cumprod[t + 1] * noise
    mu_q = d.posterior_mean_coef1[t + 1] * x0 + d.posterior_mean_coef2[t + 1] * x_next
    var = d.posterior_std[t + 1] ** 2
    q = torch.distributions.Normal(mu_q, var.sqrt())
    p = torch.distributions.Normal(pred, var.sqrt())
    assert torch.allclose(kl, torch.distributions.kl_divergence(q, p).sum(-1), rtol=1e-4)
