"""The diffusion process of every generator, through diffusers' schedulers (DDPM, DDIM).

One place owns the noise schedule and everything done with it:

* :class:`SchedulerConfig`: the typed ``DDPMScheduler`` settings a generator is trained and sampled
  with (``scheduler:`` of the train config, ``scheduler`` of ``generator.json``);
* :func:`training_target`: what the denoiser learns to predict (epsilon, v or x0) for ``x_t``;
* :func:`one_step_recover`: Denoised Neural Weights eq. 3, the clean sample from one forward at ``t``;
* :func:`denoise`: pure noise to a clean sample with ``one_step`` recovery or the DDIM / DDPM loop;
* :func:`guided`: a conditioned denoiser with classifier-free guidance, for any of those modes.

Every method's ``sample`` (block-wise or latent) runs :func:`denoise`; the tests check it against
the exact answer for Gaussian data.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, get_args

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from ..config import ConfigError, from_dict
from .errors import GeneratorError

__all__ = ["SamplingMode", "SAMPLING_MODES", "PredictionType", "SchedulerConfig", "make_scheduler",
           "training_target", "one_step_recover", "denoise", "guided", "check_sampling"]

SamplingMode = Literal["one_step", "ddim", "ddpm"]
SAMPLING_MODES: tuple[str, ...] = get_args(SamplingMode)
PredictionType = Literal["epsilon", "v_prediction", "sample"]


@dataclass
class SchedulerConfig:
    """``diffusers.DDPMScheduler`` keywords (its defaults, except ``clip_sample``: generated weights
    are never squashed into [-1, 1]); DDIM sampling reuses the same schedule."""

    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 2e-2
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"] = "linear"
    variance_type: Literal["fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned",
                           "learned_range"] = "fixed_small"
    clip_sample: bool = False
    prediction_type: PredictionType = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    clip_sample_range: float = 1.0
    sample_max_value: float = 1.0
    timestep_spacing: Literal["linspace", "leading", "trailing"] = "leading"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False

    def __post_init__(self):
        if self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps: must be >= 1, got {self.num_train_timesteps}")

    @classmethod
    def from_mapping(cls, value: "SchedulerConfig | Mapping[str, Any] | None") -> "SchedulerConfig":
        """A config from a mapping of overrides (unknown keys / bad values: a GeneratorError naming them)."""
        if isinstance(value, cls):
            return value
        data = {k: v for k, v in dict(value or {}).items() if not k.startswith("_")}   # diffusers' _class_name
        try:
            return from_dict(cls, data, _path="scheduler")
        except (ConfigError, ValueError) as exc:
            msg = str(exc)
            raise GeneratorError(msg if msg.startswith("scheduler") else f"scheduler: {msg}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def make_scheduler(config: SchedulerConfig, mode: str = "ddpm") -> DDPMScheduler | DDIMScheduler:
    """The diffusers scheduler of ``mode`` (``one_step`` and ``ddpm``: DDPM; ``ddim``: DDIM on the same betas)."""
    base = DDPMScheduler(**config.to_dict())
    return DDIMScheduler.from_config(base.config) if mode == "ddim" else base


def training_target(scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor,
                    t: torch.Tensor) -> torch.Tensor:
    """What the denoiser predicts at ``x_t = add_noise(x0, noise, t)``: epsilon, v or x0."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    if kind == "sample":
        return x0
    raise GeneratorError(f"scheduler.prediction_type: {kind!r} is not epsilon, v_prediction or sample")


def one_step_recover(x_t: torch.Tensor, model_out: torch.Tensor, alpha_bar_t: float,
                     prediction_type: str = "epsilon") -> torch.Tensor:
    """Direct recovery of the clean sample from one forward at timestep t (Denoised Weights eq. 3).

    With alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t) and x_t = alpha_t w + sigma_t eps:
    w0 = (x_t - sigma_t eps_hat) / alpha_t (the paper typesets it as (1/alpha_t) x_t - sigma_t eps_hat,
    which is the same up to the placement of the 1/alpha_t factor; this is the exact inverse).
    v-prediction: w0 = alpha_t x_t - sigma_t v_hat; sample prediction: the output itself."""
    a = float(alpha_bar_t) ** 0.5
    s = (1.0 - float(alpha_bar_t)) ** 0.5
    if prediction_type == "epsilon":
        return (x_t - s * model_out) / a
    if prediction_type == "v_prediction":
        return a * x_t - s * model_out
    if prediction_type == "sample":
        return model_out
    raise GeneratorError(f"scheduler.prediction_type: {prediction_type!r} is not epsilon, v_prediction or sample")


def check_sampling(config: SchedulerConfig, mode: str, t: int, steps: int) -> None:
    """Refuse a sampling request the schedule cannot run (a GeneratorError naming the field)."""
    T = config.num_train_timesteps
    if mode not in SAMPLING_MODES:
        raise GeneratorError(f"mode: {mode!r} is not one of {', '.join(SAMPLING_MODES)}")
    if mode == "one_step" and not 0 <= t < T:
        raise GeneratorError(f"t: {t} is outside [0, {T})")
    if mode != "one_step" and not 1 <= steps <= T:
        raise GeneratorError(f"steps: {steps} is outside [1, {T}]")


Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
CondDenoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def guided(fn: CondDenoiser, cond: torch.Tensor, null: torch.Tensor, scale: float) -> Denoiser:
    """Classifier-free guidance: ``fn(x_t, timesteps, cond) -> output`` as a :data:`Denoiser` whose
    output is ``out_null + scale * (out_cond - out_null)`` (``cond``/``null``: one row per row of
    ``x_t``).  The combination is linear in the output, so it is the same for epsilon, v and sample
    prediction.  ``scale`` 1 runs the conditional pass only, 0 the null pass only; any other scale
    runs both in one batched forward.  ``cond``/``null`` may also be a condition object with a
    ``cat`` classmethod (:class:`rayweights.conditioning.TokenCondition`: tokens, mask, pooled)."""
    if scale == 1.0:
        return lambda x, t: fn(x, t, cond)
    if scale == 0.0:
        return lambda x, t: fn(x, t, null)

    both_conds = torch.cat([cond, null]) if isinstance(cond, torch.Tensor) else type(cond).cat([cond, null])

    def both(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = fn(torch.cat([x, x]), torch.cat([t, t]), both_conds).float()
        out_cond, out_null = out[:x.shape[0]], out[x.shape[0]:]
        return out_null + scale * (out_cond - out_null)
    return both


def denoise(fn: Denoiser, x: torch.Tensor, config: SchedulerConfig, mode: str = "one_step", t: int = 500,
            steps: int = 50, eta: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Run ``fn(x_t, timesteps [B]) -> model output`` from pure noise ``x`` to a clean sample.

    ``one_step``: one forward at ``t`` and :func:`one_step_recover`; ``ddim`` (``eta``) / ``ddpm``:
    ``steps`` scheduler steps, one batched forward each (``generator`` draws the steps' noise)."""
    check_sampling(config, mode, t, steps)
    sched = make_scheduler(config, mode)
    if mode == "one_step":
        tt = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
        return one_step_recover(x, fn(x, tt).float(), float(sched.alphas_cumprod[int(t)]),
                                sched.config.prediction_type)
    sched.set_timesteps(steps, device=x.device)
    kw = {"eta": eta} if mode == "ddim" else {}
    for st in sched.timesteps:
        tt = torch.full((x.shape[0],), int(st), dtype=torch.long, device=x.device)
        x = sched.step(fn(x, tt).float(), int(st), x, generator=generator, **kw).prev_sample
    return x
