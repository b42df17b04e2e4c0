"""Gaussian diffusion as DiT trains and samples it (Ho et al. 2020; Nichol & Dhariwal 2021).

Forward process: ``q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)`` with linear betas
``1e-4 .. 0.02`` over 1000 steps (both ends scaled by ``1000 / T`` for other step counts).

The model predicts the noise ``eps``. With ``learn_sigma`` it also outputs ``C`` more channels
``v`` in [-1, 1] that interpolate the reverse variance in log space between the posterior
variance ``beta~_t`` (v = -1) and ``beta_t`` (v = +1); the loss is then
``mse(eps) + vb``, where ``vb`` (in bits per dimension, scaled by ``T / 1000``) is the KL between
the true posterior ``q(x_{t-1} | x_t, x_0)`` and the model's ``p(x_{t-1} | x_t)``, or at ``t = 0``
the decoder's negative log-likelihood, computed with the mean detached so that it trains only the
variance. Without ``learn_sigma`` the reverse variance is fixed (``beta_t`` by default, DiT's
choice; ``sigma_small=True`` for ``beta~_t``) and the loss is the plain eps-MSE.

Samplers: ancestral DDPM and DDIM (``eta``), both over a respaced subsequence of the steps
(``timestep_respacing``, see ``respace.py``). Classifier-free guidance is a property of the
``model_fn`` handed to the samplers (e.g. ``DiT.forward_with_cfg``); ``sample()`` wires it up.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch

from .respace import respaced_betas, space_timesteps

__all__ = [
    "GaussianDiffusion",
    "linear_betas",
    "normal_kl",
    "approx_standard_normal_cdf",
    "discretized_gaussian_log_likelihood",
    "classifier_free_guidance",
    "sample",
]

ModelFn = Callable[..., torch.Tensor]


# ----------------------------------------------------------------------------------------------
# Schedules and densities
# ----------------------------------------------------------------------------------------------

def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDPM's linear schedule in float64; the ends scale by 1000/T so any T spans the same noise."""
    scale = 1000.0 / num_timesteps
    return torch.linspace(beta_start * scale, beta_end * scale, num_timesteps, dtype=torch.float64)


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats (broadcasts)."""
    return 0.5 * (
        logvar2 - logvar1 - 1.0 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Phi(x) through the tanh approximation used by the DDPM/ADM/DiT losses (|error| < 2e-4)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Elementwise log-probability (nats) of data ``x`` in [-1, 1] quantised to 256 levels.

    Each level owns the interval ``x +- 1/255`` under ``N(means, exp(log_scales)^2)``; the two end
    levels take the open tails, so the 256 probabilities sum to one.
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_upper = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_lower = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_below_upper = torch.log(cdf_upper.clamp(min=1e-12))
    log_above_lower = torch.log((1.0 - cdf_lower).clamp(min=1e-12))
    log_bin = torch.log((cdf_upper - cdf_lower).clamp(min=1e-12))
    return torch.where(x < -0.999, log_below_upper, torch.where(x > 0.999, log_above_lower, log_bin))


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


# ----------------------------------------------------------------------------------------------
# The diffusion process
# ----------------------------------------------------------------------------------------------

class GaussianDiffusion:
    """DiT's diffusion: schedule tables, training loss and samplers.

    Args:
        num_timesteps: steps of the process the model was trained with (DiT: 1000).
        learn_sigma: the model outputs ``2C`` channels (eps, variance interpolation); else ``C``.
        timestep_respacing: run only a subsequence of the steps (``250``, ``"ddim50"``, ...; see
            ``respace.space_timesteps``). Tables and ``num_timesteps`` then describe the respaced
            process, and the model is called with the original step numbers.
        sigma_small: with fixed sigma, use the posterior variance ``beta~_t`` instead of ``beta_t``.

    All tables are float64 on the CPU; lookups return float32 on the device of the timesteps.
    """

    def __init__(self, num_timesteps: int = 1000, learn_sigma: bool = True, timestep_respacing=None,
                 *, sigma_small: bool = False):
        if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 1:
            raise ValueError(f"num_timesteps must be a positive int, got {num_timesteps!r}")
        base_betas = linear_betas(num_timesteps)
        if float(base_betas[-1]) >= 1.0:
            raise ValueError(
                f"num_timesteps must be > 20 (the scaled linear schedule reaches beta = 1), got {num_timesteps}"
            )
        self.original_num_steps = num_timesteps
        self.learn_sigma = bool(learn_sigma)
        self.sigma_small = bool(sigma_small)
        kept = space_timesteps(num_timesteps, timestep_respacing)
        if len(kept) == num_timesteps:
            betas = base_betas
        else:
            betas = respaced_betas(torch.cumprod(1.0 - base_betas, dim=0), kept)
        self.timestep_map = torch.tensor(kept, dtype=torch.long)
        self._set_tables(betas)
        self._device_tables: dict[tuple[str, torch.device], torch.Tensor] = {}

    def _set_tables(self, betas: torch.Tensor) -> None:
        self.betas = betas
        self.num_timesteps = len(betas)
        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([betas.new_ones(1), self.alphas_cumprod[:-1]])
        acp, acp_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        self.sqrt_alphas_cumprod = acp.sqrt()
        self.one_minus_alphas_cumprod = 1.0 - acp  # float64 here: 1 - abar cancels badly in float32
        self.one_minus_alphas_cumprod_prev = 1.0 - acp_prev
        self.sqrt_one_minus_alphas_cumprod = (1.0 - acp).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / acp).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / acp - 1.0).sqrt()
        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta~_t), beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)
        self.posterior_variance = betas * (1.0 - acp_prev) / (1.0 - acp)
        self.posterior_mean_coef1 = betas * acp_prev.sqrt() / (1.0 - acp)
        self.posterior_mean_coef2 = (1.0 - acp_prev) * alphas.sqrt() / (1.0 - acp)
        # beta~_0 = 0: its log is clipped to beta~_1 (a one-step process falls back to beta_0).
        first = self.posterior_variance[1:2] if self.num_timesteps > 1 else betas[:1]
        self.posterior_log_variance_clipped = torch.cat([first, self.posterior_variance[1:]]).log()
        self.log_betas = betas.log()
        # DDIM's sigma_t at eta = 1: sqrt(beta~_t) with the (possibly respaced) process's steps.
        self.ddim_sigma_eta1 = self.posterior_variance.sqrt()
        # Fixed-sigma reverse variances: "large" is beta_t, but with beta~_1 at t = 0 (as DDPM/ADM).
        self.fixed_large_log_variance = torch.cat([first, betas[1:]]).log()

    # --- table lookup ---------------------------------------------------------------------------

    def _table(self, name: str, device: torch.device) -> torch.Tensor:
        key = (name, device)
        table = self._device_tables.get(key)
        if table is None:
            table = getattr(self, name).to(torch.float32).to(device)
            self._device_tables[key] = table
        return table

    def _extract(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``table[t]`` as float32, shaped (N, 1, 1, ...) to broadcast against ``like``."""
        values = self._table(name, t.device)[t]
        return values.view(t.shape[0], *([1] * (like.ndim - 1)))

    def _check_t(self, t: torch.Tensor, x: torch.Tensor) -> None:
        if t.ndim != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"t must have shape ({x.shape[0]},) (one step per sample), got {tuple(t.shape)}")

    # --- forward process ------------------------------------------------------------------------

    def q_mean_variance(self, x0: torch.Tensor, t: torch.Tensor):
        """Mean, variance and log-variance of ``q(x_t | x_0)``."""
        mean = self._extract("sqrt_alphas_cumprod", t, x0) * x0
        variance = self._extract("one_minus_alphas_cumprod", t, x0).expand_as(x0)
        return mean, variance, variance.log()

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Draw ``x_t ~ q(x_t | x_0)``: ``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``."""
        self._check_t(t, x0)
        if noise is None:
            noise = torch.randn_like(x0)
        if noise.shape != x0.shape:
            raise ValueError(f"noise must have the shape of x0 {tuple(x0.shape)}, got {tuple(noise.shape)}")
        return (self._extract("sqrt_alphas_cumprod", t, x0) * x0
                + self._extract("sqrt_one_minus_alphas_cumprod", t, x0) * noise)

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log-variance of ``q(x_{t-1} | x_t, x_0)``."""
        mean = self._extract("posterior_mean_coef1", t, x_t) * x0 + self._extract("posterior_mean_coef2", t, x_t) * x_t
        variance = self._extract("posterior_variance", t, x_t).expand_as(x_t)
        log_variance = self._extract("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    def predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps

    def predict_eps_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return (self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - x0) / self._extract("sqrt_recipm1_alphas_cumprod", t, x_t)

    # --- reverse process ------------------------------------------------------------------------

    def model_output(self, model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor, model_kwargs=None) -> torch.Tensor:
        """Call ``model_fn(x, original_t, **model_kwargs)``; check and return its output (>= fp32)."""
        self._check_t(t, x)
        original_t = self.timestep_map.to(t.device)[t]
        out = model_fn(x, original_t, **(model_kwargs or {}))
        channels = x.shape[1] * (2 if self.learn_sigma else 1)
        expected = (x.shape[0], channels, *x.shape[2:])
        if tuple(out.shape) != expected:
            hint = "2C channels (learn_sigma=True)" if self.learn_sigma else "C channels (learn_sigma=False)"
            raise ValueError(
                f"model output has shape {tuple(out.shape)}, expected {expected} ({hint}); "
                "match GaussianDiffusion(learn_sigma=...) to the model"
            )
        return out.to(torch.promote_types(out.dtype, torch.float32))

    def p_mean_variance_from_output(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
                                    clip_denoised: bool = False) -> dict[str, torch.Tensor]:
        """``p(x_{t-1} | x_t)`` from a raw model output: mean, variance, log_variance, pred_xstart, eps."""
        x = x.to(out.dtype)
        channels = x.shape[1]
        if self.learn_sigma:
            eps, v = out[:, :channels], out[:, channels:]
            frac = (v + 1.0) / 2.0
            log_variance = (frac * self._extract("log_betas", t, x)
                            + (1.0 - frac) * self._extract("posterior_log_variance_clipped", t, x))
        else:
            eps = out
            name = "posterior_log_variance_clipped" if self.sigma_small else "fixed_large_log_variance"
            log_variance = self._extract(name, t, x).expand_as(x)
        pred_xstart = self.predict_xstart_from_eps(x, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1.0, 1.0)
        mean, _, _ = self.q_posterior(pred_xstart, x, t)
        return dict(mean=mean, variance=log_variance.exp(), log_variance=log_variance,
                    pred_xstart=pred_xstart, eps=eps)

    def p_mean_variance(self, model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor, model_kwargs=None,
                        clip_denoised: bool = False) -> dict[str, torch.Tensor]:
        """Run the model and return ``p(x_{t-1} | x_t)`` (see ``p_mean_variance_from_output``)."""
        out = self.model_output(model_fn, x, t, model_kwargs)
        return self.p_mean_variance_from_output(out, x, t, clip_denoised)

    # --- training -------------------------------------------------------------------------------

    def vb_terms(self, out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                 clip_denoised: bool = False) -> torch.Tensor:
        """Per-sample variational-bound term in bits/dim: KL(q || p) for t > 0, decoder NLL at t = 0."""
        true_mean, _, true_log_variance = self.q_posterior(x0.to(out.dtype), x_t.to(out.dtype), t)
        p = self.p_mean_variance_from_output(out, x_t, t, clip_denoised)
        kl = _mean_flat(normal_kl(true_mean, true_log_variance, p["mean"], p["log_variance"])) / math.log(2.0)
        nll = -_mean_flat(discretized_gaussian_log_likelihood(
            x0.to(out.dtype), means=p["mean"], log_scales=0.5 * p["log_variance"])) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model: ModelFn, x0: torch.Tensor, t: torch.Tensor, model_kwargs=None,
                        noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """DiT's loss at steps ``t`` (indices of this, possibly respaced, process), per sample.

        Returns ``loss = mse + vb``, ``mse`` (eps regression) and ``vb`` (zeros without learned
        sigma). ``vb`` sees the eps prediction detached, so it only trains the variance channels.
        """
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        out = self.model_output(model, x_t, t, model_kwargs)
        channels = x0.shape[1]
        eps = out[:, :channels]
        mse = _mean_flat((noise.to(eps.dtype) - eps) ** 2)
        if self.learn_sigma:
            frozen = torch.cat([eps.detach(), out[:, channels:]], dim=1)
            # The original rescales the bound by T/1000 so its weight against the MSE matches T = 1000.
            vb = self.vb_terms(frozen, x0, x_t, t) * (self.num_timesteps / 1000.0)
        else:
            vb = torch.zeros_like(mse)
        return dict(loss=mse + vb, mse=mse, vb=vb)

    # --- sampling -------------------------------------------------------------------------------

    def p_sample(self, model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor, model_kwargs=None,
                 clip_denoised: bool = False, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """One ancestral step ``x_t -> x_{t-1}`` (no noise is added at ``t = 0``)."""
        p = self.p_mean_variance(model_fn, x, t, model_kwargs, clip_denoised)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=p["mean"].dtype)
        not_last = (t != 0).to(p["mean"].dtype).view(-1, *([1] * (x.ndim - 1)))
        sample = p["mean"] + not_last * torch.exp(0.5 * p["log_variance"]) * noise
        return dict(sample=sample, pred_xstart=p["pred_xstart"])

    def ddim_sample(self, model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor, model_kwargs=None,
                    clip_denoised: bool = False, eta: float = 0.0,
                    generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """One DDIM step (Song et al. 2021, eq. 12); ``eta = 0`` is deterministic, 1 matches DDPM's KL."""
        p = self.p_mean_variance(model_fn, x, t, model_kwargs, clip_denoised)
        x = x.to(p["mean"].dtype)
        pred_xstart = p["pred_xstart"]
        eps = self.predict_eps_from_xstart(x, t, pred_xstart)  # consistent with a clipped x0
        # sigma_t = eta * sqrt((1 - abar') / (1 - abar) * (1 - abar / abar')) = eta * sqrt(beta~_t)
        sigma = eta * self._extract("ddim_sigma_eta1", t, x)
        one_minus_prev = self._extract("one_minus_alphas_cumprod_prev", t, x)
        direction = (one_minus_prev - sigma**2).clamp(min=0.0).sqrt() * eps
        sample = self._extract("alphas_cumprod_prev", t, x).sqrt() * pred_xstart + direction
        if eta > 0:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            not_last = (t != 0).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
            sample = sample + not_last * sigma * noise
        return dict(sample=sample, pred_xstart=pred_xstart)

    def p_sample_loop(self, model_fn: ModelFn, shape, noise: torch.Tensor | None = None, model_kwargs=None,
                      progress: bool = False, generator: torch.Generator | None = None,
                      clip_denoised: bool = False, device=None) -> torch.Tensor:
        """Ancestral sampling from ``x_T ~ N(0, I)`` (or ``noise``) down to ``x_0``; returns ``x_0``."""
        final = None
        for step in self.p_sample_loop_progressive(model_fn, shape, noise, model_kwargs, progress,
                                                   generator, clip_denoised, device):
            final = step
        return final["sample"]

    def p_sample_loop_progressive(self, model_fn: ModelFn, shape, noise=None, model_kwargs=None,
                                  progress: bool = False, generator=None, clip_denoised: bool = False,
                                  device=None) -> Iterator[dict[str, torch.Tensor]]:
        """Like ``p_sample_loop`` but yields every step's ``{"sample", "pred_xstart"}``."""
        def step(x, t):
            return self.p_sample(model_fn, x, t, model_kwargs, clip_denoised, generator)
        yield from self._loop(step, shape, noise, progress, generator, device)

    def ddim_sample_loop(self, model_fn: ModelFn, shape, noise: torch.Tensor | None = None, model_kwargs=None,
                         progress: bool = False, generator: torch.Generator | None = None,
                         clip_denoised: bool = False, eta: float = 0.0, device=None) -> torch.Tensor:
        """DDIM sampling over this process's (respaced) steps; returns ``x_0``."""
        final = None
        for step in self.ddim_sample_loop_progressive(model_fn, shape, noise, model_kwargs, progress,
                                                      generator, clip_denoised, eta, device):
            final = step
        return final["sample"]

    def ddim_sample_loop_progressive(self, model_fn: ModelFn, shape, noise=None, model_kwargs=None,
                                     progress: bool = False, generator=None, clip_denoised: bool = False,
                                     eta: float = 0.0, device=None) -> Iterator[dict[str, torch.Tensor]]:
        """Like ``ddim_sample_loop`` but yields every step's ``{"sample", "pred_xstart"}``."""
        if not eta >= 0.0:
            raise ValueError(f"eta must be >= 0 (0 = deterministic DDIM, 1 = DDPM-like), got {eta}")

        def step(x, t):
            return self.ddim_sample(model_fn, x, t, model_kwargs, clip_denoised, eta, generator)
        yield from self._loop(step, shape, noise, progress, generator, device)

    def _loop(self, step, shape, noise, progress, generator, device):
        shape = tuple(shape)
        if noise is not None:
            if tuple(noise.shape) != shape:
                raise ValueError(f"noise must have shape {shape}, got {tuple(noise.shape)}")
            x = noise
        else:
            if device is None:
                device = generator.device if generator is not None else torch.device("cpu")
            x = torch.randn(shape, generator=generator, device=device)
        steps = range(self.num_timesteps - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm
            steps = tqdm(steps, desc="sampling", unit="step")
        for i in steps:
            t = torch.full((shape[0],), i, dtype=torch.long, device=x.device)
            with torch.no_grad():  # entered per step: a suspended generator must not leak no-grad
                out = step(x, t)
            x = out["sample"]
            yield out


# ----------------------------------------------------------------------------------------------
# Classifier-free guidance and the one-call sampler
# ----------------------------------------------------------------------------------------------

def classifier_free_guidance(model: ModelFn, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                             in_channels: int, guided_channels: int | None = None) -> torch.Tensor:
    """Guided output for a batch whose first half is conditional and second half null-class.

    Runs ``model`` on the first half of ``x`` twice (with both halves of ``y``) and returns, for
    both halves, ``uncond + cfg_scale * (cond - uncond)`` on the first ``guided_channels``
    (default: all ``in_channels`` eps channels); the other channels (the variance interpolation)
    pass through per half. Same math as ``DiT.forward_with_cfg``, for models that lack that
    method (e.g. traced graphs).
    """
    half = x[: x.shape[0] // 2]
    out = model(torch.cat([half, half]), t, y)
    ch = in_channels if guided_channels is None else guided_channels
    eps, rest = out[:, :ch], out[:, ch:]
    cond, uncond = eps.chunk(2)
    guided = uncond + cfg_scale * (cond - uncond)
    return torch.cat([torch.cat([guided, guided]), rest], dim=1)


@contextlib.contextmanager
def _eval_mode(model):
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        yield
    finally:
        if hasattr(model, "train"):
            model.train(was_training)


def sample(model, labels, *, steps=250, cfg_scale: float = 1.0, sampler: str = "ddpm",
           generator: torch.Generator | None = None, progress: bool = False, eta: float = 0.0,
           noise: torch.Tensor | None = None, guided_channels: int | None = None,
           num_timesteps: int = 1000, clip_denoised: bool = False, config=None) -> torch.Tensor:
    """Class-conditional samples (latents ``x_0``) from a DiT, with optional classifier-free guidance.

    ``steps``: respacing of the ``num_timesteps`` training steps (int, or e.g. ``"ddim50"``).
    ``cfg_scale`` != 1 doubles the batch with the null class ``config.num_classes`` and guides
    through ``model.forward_with_cfg`` when the model has it (else the same math on ``model``).
    ``guided_channels=3`` reproduces the reference DiT sampler. ``config`` defaults to
    ``model.config`` (a ``DiTConfig``); pass it for models without one (e.g. traced graphs).
    The model runs in eval mode (restored afterwards) without autograd; returns float32 latents.
    """
    config = config if config is not None else getattr(model, "config", None)
    if config is None:
        raise ValueError("model has no .config: pass config=<the model's DiTConfig>")
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
    if not math.isfinite(cfg_scale):
        raise ValueError(f"cfg_scale must be a finite number, got {cfg_scale}")
    use_cfg = cfg_scale != 1.0
    if use_cfg and not config.class_dropout_prob > 0:
        raise ValueError(
            "cfg_scale != 1 needs the null-class embedding, but the model has class_dropout_prob=0; "
            "use cfg_scale=1.0"
        )
    param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    device = param.device if param is not None else torch.device("cpu")
    model_dtype = param.dtype if param is not None else torch.float32
    labels = torch.as_tensor(labels, dtype=torch.long, device=device)
    if labels.ndim != 1 or labels.numel() == 0:
        raise ValueError(f"labels must be a non-empty 1-D list of class ids, got shape {tuple(labels.shape)}")
    if int(labels.min()) < 0 or int(labels.max()) >= config.num_classes:
        raise ValueError(f"labels must lie in [0, {config.num_classes}), got {labels.tolist()}")

    n = labels.shape[0]
    shape = (n, config.in_channels, config.input_size, config.input_size)
    diffusion = GaussianDiffusion(num_timesteps, learn_sigma=config.learn_sigma, timestep_respacing=steps)
    if noise is None:
        noise = torch.randn(shape, generator=generator, device=device)
    elif tuple(noise.shape) != shape:
        raise ValueError(f"noise must have shape {shape}, got {tuple(noise.shape)}")
    noise = noise.to(device=device, dtype=torch.float32)

    if use_cfg:
        noise = torch.cat([noise, noise])
        y = torch.cat([labels, torch.full_like(labels, config.num_classes)])
        if hasattr(model, "forward_with_cfg"):
            def model_fn(x, t, y):
                return model.forward_with_cfg(x.to(model_dtype), t, y, cfg_scale, guided_channels)
        else:
            def model_fn(x, t, y):
                return classifier_free_guidance(model, x.to(model_dtype), t, y, cfg_scale,
                                                config.in_channels, guided_channels)
    else:
        y = labels

        def model_fn(x, t, y):
            return model(x.to(model_dtype), t, y)

    with _eval_mode(model):
        if sampler == "ddpm":
            out = diffusion.p_sample_loop(model_fn, noise.shape, noise=noise, model_kwargs=dict(y=y),
                                          progress=progress, generator=generator, clip_denoised=clip_denoised)
        else:
            out = diffusion.ddim_sample_loop(model_fn, noise.shape, noise=noise, model_kwargs=dict(y=y),
                                             progress=progress, generator=generator,
                                             clip_denoised=clip_denoised, eta=eta)
    return out[:n]
