"""The diffusion process (paper section 3.1, 3.3), as improved-diffusion's GaussianDiffusion: the
noise schedule, the forward noising q(x_t | x_0) and the reverse chain that the decoder drives.

Indexing: diffusion indices t = 0..T, where x_0 is the clean target item embedding and
x_1..x_T are ever noisier; beta_1..beta_T rise linearly from ``beta_1`` to ``beta_T``.
Every coefficient is computed once in float64 and stored as a float32 buffer of length T + 1
(index 0 is the clean state: beta_0 = 0, alpha_bar_0 = 1).

The reverse chain runs T decoder steps t = T-1, ..., 0. Step t generates x_hat_t from
x_hat_{t+1}; its target is the posterior q(x_t | x_{t+1}, x_0), whose variance is
beta_hat_{t+1} (Eq. 4's noise scale), which is 0 at t = 0: the last step adds no noise.

Letters: B batch, L positions, Q query positions (L, or 1 for the last position only), n flat
rows of the (B, L) grid, d hidden size, H heads, h = d / H, T steps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .model import DenoisingDecoder


class GaussianDiffusion(nn.Module):
    """Linear-beta schedule with the coefficients of q(x_t | x_0) and q(x_{t-1} | x_t, x_0), the forward
    noising (``q_sample``), the per-step KL of the objective (``step_kl``) and the reverse chain (``reverse``).

    Buffers (float32, length T + 1, non-persistent: recomputed from the config, never in a model
    file): ``sqrt_alphas_cumprod``, ``sqrt_one_minus_alphas_cumprod`` (Eq. 1-2),
    ``posterior_mean_coef1``/``2`` (the posterior mean), ``posterior_std`` (Eq. 4's noise scale) and
    ``posterior_variance_clipped`` (the KL's variance).
    """

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
            "sqrt_alphas_cumprod": ab.sqrt(),
            "sqrt_one_minus_alphas_cumprod": one_minus.clamp_min(0).sqrt(),
            "posterior_std": post_var.sqrt(),
            "posterior_variance_clipped": post_var_clipped,
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

    def reverse(self, decoder: DenoisingDecoder | None, e_s: torch.Tensor, bias: torch.Tensor, *,
                rows: torch.Tensor | None = None, last_only: bool = False, hoist: bool = True,
                sample: bool = False, noise: torch.Tensor | None = None, return_all: bool = False,
                step_q: torch.Tensor | None = None, steps: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the T-step reverse chain of ``decoder`` from x_hat_T = e_s (B, L, d), bias (B, 1, L, L).

        Step t = T-1..0 computes the mean mu_t = decoder(x_hat_{t+1}, t, e_s) and the next state
        x_hat_t = mu_t (deterministic) or mu_t + sqrt(beta_hat_{t+1}) eps (``sample``, Eq. 4);
        ``noise`` (T, B, Q, d), indexed by step t, makes sampling explicit and reproducible.
        ``step_q`` (T, d): precomputed ``decoder.step_queries()`` (the graph's constant).
        ``steps`` S (1..T; None: all T): early exit, stop after the first S steps (``timesteps``) and
        return x_hat_{T-S}, the state ``cddrec-eval --stages`` lists as stage S.

        The plain reference decodes every position and projects the history to keys and values and
        the step embedding to its query at every step (``hoist=False``). The fast paths, tested
        against it, project once (``hoist``, the default), decode only the last position
        (``last_only``, Q = 1), or only the flat positions ``rows`` (n,) of the (B, L) grid (states
        (n, d)); training decodes just the positions that have a target this way. Without a decoder
        (the SASRec baseline) the start state is the result.

        Returns the final state (B, Q, d) or (n, d) and, with ``return_all``, the states of every
        step run, ordered t = T-1, ..., T-S (``[x]`` without a decoder).
        """
        B, L, d = e_s.shape
        if rows is not None:
            x = e_s.reshape(B * L, d)[rows]  # (n, d)
        elif last_only:
            x, bias = e_s[:, -1:], bias[:, :, -1:]  # (B, 1, d), (B, 1, 1, L)
        else:
            x = e_s  # (B, L, d)
        if decoder is None:
            return x, [x]
        timesteps = self.timesteps(steps)  # checked before any work
        kv = decoder.memory(e_s) if hoist else None  # (B, H, h, L), (B, H, L, h)
        if hoist and step_q is None:
            step_q = decoder.step_queries()  # (T, d), once for the T steps
        elif not hoist:
            step_q = None
        states = []
        for t in timesteps:  # unrolled when traced
            k, v = kv if kv is not None else decoder.memory(e_s)
            mu = decoder(x, t, k, v, bias, rows, step_q)  # same shape as x
            x = self.p_sample(mu, t, sample, noise[t] if noise is not None and t > 0 else None)
            if return_all:
                states.append(x)
        return x, states

    def timesteps(self, steps: int | None = None) -> range:
        """The decoder steps in the order the reverse chain runs them: t = T-1, ..., 0; with ``steps``
        S (early exit, 1 <= S <= T), only the first S of them: t = T-1, ..., T-S. The one place the
        chain's length is decided (the model, evaluation and every exported graph run through it)."""
        if steps is None:
            steps = self.steps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= self.steps:
            raise ValueError(f"steps must be an integer between 1 and T={self.steps} (early exit after S of the T "
                             f"reverse steps), got {steps!r}")
        return range(self.steps - 1, self.steps - 1 - steps, -1)

    def p_sample(self, mu: torch.Tensor, t: int, sample: bool = False,
                 noise: torch.Tensor | None = None) -> torch.Tensor:
        """The state after decoder step t from its mean ``mu``: mu + sqrt(beta_hat_{t+1}) eps with the
        given ``noise`` or, with ``sample``, fresh noise (Eq. 4); else mu. The last step (t = 0) adds
        no noise (its std is 0)."""
        if t == 0:
            return mu
        if noise is not None:
            return mu + self.step_std(t) * noise
        if sample:
            return mu + self.step_std(t) * torch.randn_like(mu)
        return mu
