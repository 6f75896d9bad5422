"""The diffusion schedule (paper section 3.1, 3.3), as improved-diffusion's GaussianDiffusion.

Indexing: diffusion indices t = 0..T, where x_0 is the clean target item embedding and
x_1..x_T are ever noisier; beta_1..beta_T rise linearly from ``beta_1`` to ``beta_T``.
Every coefficient is computed once in float64 and stored as a float32 buffer of length T + 1
(index 0 is the clean state: beta_0 = 0, alpha_bar_0 = 1).

The reverse chain runs T decoder steps t = T-1, ..., 0. Step t generates x_hat_t from
x_hat_{t+1}; its target is the posterior q(x_t | x_{t+1}, x_0), whose variance is
beta_hat_{t+1} (Eq. 4's noise scale), which is 0 at t = 0: the last step adds no noise.

Letters: B batch, L positions, d hidden size.
"""

from __future__ import annotations

import torch
from torch import nn


class GaussianDiffusion(nn.Module):
    """Linear-beta schedule with the coefficients of q(x_t | x_0) and q(x_{t-1} | x_t, x_0)."""

    def __init__(self, steps: int, beta_1: float, beta_T: float):
        super().__init__()
        if steps < 1:
            raise ValueError("steps must be >= 1")
        self.steps = steps
        f64 = torch.float64
        betas = torch.cat([torch.zeros(1, dtype=f64), torch.linspace(beta_1, beta_T, steps, dtype=f64)])
        alphas = 1.0 - betas
        ab = torch.cumprod(alphas, 0)  # alpha_bar_t, ab[0] = 1
        ab_prev = torch.cat([torch.ones(1, dtype=f64), ab[:-1]])
        # q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I)   (Eq. 1)
        one_minus = 1.0 - ab
        safe = torch.where(one_minus > 0, one_minus, torch.ones_like(one_minus))  # t = 0 is exact
        # q(x_{t-1} | x_t, x_0) = N(c1_t x_0 + c2_t x_t, beta_hat_t I), defined for t >= 1
        post_var = torch.where(one_minus > 0, betas * (1.0 - ab_prev) / safe, torch.zeros_like(ab))
        c1 = torch.where(one_minus > 0, betas * ab_prev.sqrt() / safe, torch.ones_like(ab))
        c2 = torch.where(one_minus > 0, (1.0 - ab_prev) * alphas.sqrt() / safe, torch.zeros_like(ab))
        # beta_hat_1 = 0 (the posterior of the clean state is a point); for log-variances and the
        # KL it is clipped to beta_hat_2, as improved-diffusion's posterior_log_variance_clipped.
        clip = post_var[2] if steps >= 2 else betas[1]
        post_var_clipped = torch.cat([post_var[:1], clip.view(1), post_var[2:]])
        post_var_clipped[0] = clip
        buffers = {
            "betas": betas,
            "alphas_cumprod": ab,
            "alphas_cumprod_prev": ab_prev,
            "sqrt_alphas_cumprod": ab.sqrt(),
            "sqrt_one_minus_alphas_cumprod": one_minus.clamp_min(0).sqrt(),
            "posterior_variance": post_var,
            "posterior_variance_clipped": post_var_clipped,
            "posterior_log_variance_clipped": post_var_clipped.log(),
            "posterior_std": post_var.sqrt(),
            "posterior_mean_coef1": c1,
            "posterior_mean_coef2": c2,
        }
        for name, value in buffers.items():
            self.register_buffer(name, value.to(torch.float32), persistent=False)

    def q_sample(self, x0: torch.Tensor, t: int, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t ~ q(x_t | x_0) (Eq. 2); t = 0 returns x_0."""
        if t == 0:
            return x0
        if noise is None:
            noise = torch.randn_like(x0)
        return self.sqrt_alphas_cumprod[t] * x0 + self.sqrt_one_minus_alphas_cumprod[t] * noise

    def q_posterior_mean(self, x0: torch.Tensor, xt: torch.Tensor, t: int) -> torch.Tensor:
        """Mean of the posterior q(x_{t-1} | x_t, x_0), t >= 1."""
        return self.posterior_mean_coef1[t] * x0 + self.posterior_mean_coef2[t] * xt

    def step_std(self, t: int) -> torch.Tensor:
        """Noise scale of decoder step t (Eq. 4): sqrt(beta_hat_{t+1}); 0 at the last step t = 0."""
        return self.posterior_std[t + 1]

    def step_kl(self, mean_pred: torch.Tensor, x0: torch.Tensor, t: int, diffuse: bool = True,
                noise: torch.Tensor | None = None) -> torch.Tensor:
        """KL[q(x_t | x_{t+1}, x_0) || N(mean_pred, beta_hat_{t+1} I)] per row (Eq. 5).

        Both are isotropic Gaussians with the same variance, so the KL is
        ||mu_q - mean_pred||^2 / (2 beta_hat_{t+1}); x_{t+1} ~ q(x_{t+1} | x_0) is drawn.
        ``mean_pred``, ``x0``: (..., d); returns (...). ``diffuse=False`` (ablation "-Diffusion")
        replaces the posterior mean by the clean x_0.
        """
        if diffuse:
            mu_q = self.q_posterior_mean(x0, self.q_sample(x0, t + 1, noise), t + 1)
        else:
            mu_q = x0
        return (mu_q - mean_pred).pow(2).sum(-1) / (2.0 * self.posterior_variance_clipped[t + 1])
