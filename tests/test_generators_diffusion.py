"""The production sampling path of every method (``GeneratorMethod.sample`` ->
``rayweights.generators.diffusion.denoise``) against the exact answer for Gaussian data.

Each method's denoising network is replaced by the exact (MMSE) predictor for data
x0 ~ N(mu_c, var) per coordinate (mu_c: one mean per condition and position), so one-step
recovery must equal E[x0 | x_t] in closed form, and DDIM / DDPM must draw from N(mu_c, var).
The latent methods decode through a known linear map (latent coordinate k -> the k-th real weight),
so their samples are checked in weight space, latent scale included."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rayweights.blocks import WeightLayout
from rayweights.conditioning import ConditionCache
from rayweights.generators import (GeneratorError, SchedulerConfig, build_method, check_sampling, make_scheduler,
                                   one_step_recover)
from tests.genkit import CONDITIONS, mlp_state_dict

pytestmark = pytest.mark.usefixtures("torch_one_thread")

STD = 0.5                                   # data std of every coordinate


@pytest.fixture(scope="module")
def layout():
    L = WeightLayout.from_state_dict(mlp_state_dict(0, 0, 0), rule=1, block_size=16)
    return L.fit_stats(torch.stack([L.tokenize(mlp_state_dict(c, m, 0)) for c in range(3) for m in range(3)]))


class ExactDenoiser(nn.Module):
    """The MMSE prediction (epsilon, v or x0, per ``prediction_type``) for x0 ~ N(mu[c][index], STD^2),
    ``c`` the condition (argmax of the one-hot condition embedding; 0 when unconditioned)."""

    def __init__(self, mu: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: str, blockwise: bool):
        super().__init__()
        self.register_buffer("mu", mu)                    # [conditions, *sample shape]
        self.dummy = nn.Parameter(torch.zeros(1))        # a module with parameters, as the method expects
        self.abar, self.kind, self.blockwise, self.calls = alphas_cumprod, prediction_type, blockwise, 0

    def forward(self, x, t, *args):
        self.calls += 1
        block_index, cond = args if self.blockwise else (None, args[0])
        c = torch.zeros(x.shape[0], dtype=torch.long) if cond is None else cond.argmax(-1).cpu()
        mu = self.mu[c, block_index.cpu()] if self.blockwise else self.mu[c]
        ab = self.abar[t.cpu()].to(x.dtype).view(-1, *[1] * (x.dim() - 1))
        a, s = ab.sqrt(), (1 - ab).sqrt()
        eps = s * (x - a * mu) / (a * a * STD ** 2 + s * s)
        x0 = (x - s * eps) / a
        return {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0}[self.kind]


class LinearDecoder(nn.Module):
    """First-stage stand-in: latent coordinate k -> the k-th real (non-padding) weight, others 0."""

    def __init__(self, layout: WeightLayout, latent_numel: int):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.index = torch.nonzero(layout.valid_mask.reshape(-1)).flatten()[:latent_numel]
        assert len(self.index) == latent_numel
        self.dim = layout.num_blocks * layout.block_size

    def decode(self, z):
        out = torch.zeros(z.shape[0], self.dim, dtype=z.dtype)
        out[:, self.index] = z.flatten(1).cpu()
        return out


def _setup(layout, name: str, prediction_type: str, latent_scale: float = 1.0):
    """(method with exact denoiser, mu [conditions, *sample shape], embed(sample) -> the coordinates mu lives on)."""
    sched = SchedulerConfig(prediction_type=prediction_type)
    abar = make_scheduler(sched).alphas_cumprod
    g = torch.Generator().manual_seed(0)
    if name == "denoised_weights":
        cache = ConditionCache(CONDITIONS, torch.eye(3, 12), "text", "one-hot")
        m = build_method(name, layout, "tiny", scheduler=sched, conditions=cache)
        mu = torch.randn(3, layout.num_blocks, layout.block_size, generator=g) * layout.valid_mask
        m.models["denoiser"] = ExactDenoiser(mu, abar, prediction_type, blockwise=True)
        return m, mu, lambda x: x
    if name == "pdiff":
        m = build_method(name, layout, "tiny", scheduler=sched)
        first = "autoencoder"
    else:
        m = build_method(name, layout, "tiny", scheduler=sched, condition_names=CONDITIONS,
                         conditions=ConditionCache(CONDITIONS, torch.eye(3, 12), "dataset", "one-hot"))
        first = "vae"
    zc, zl = m.latent_shape()
    mu = torch.randn(1 if name == "pdiff" else 3, zc, zl, generator=g)
    m.latent_scale = latent_scale
    m.models["denoiser"] = ExactDenoiser(mu, abar, prediction_type, blockwise=False)
    dec = m.models[first] = LinearDecoder(layout, zc * zl)
    # the sample's real weights back on the latent coordinates, in the denoiser's (scaled) units
    return m, mu, lambda x: x.reshape(x.shape[0], -1)[:, dec.index].reshape(-1, zc, zl) * latent_scale


METHODS = ["denoised_weights", "pdiff", "d2nwg"]


def _conditions(name):
    return None if name == "pdiff" else [CONDITIONS[1]]


def _mu(name, mu):
    return mu[0] if name == "pdiff" else mu[1]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("name", METHODS)
def test_one_step_is_the_exact_posterior_mean(layout, name, prediction_type):
    """Eq. 3 at t: the sample is E[x0 | x_t] = mu + a var (x_t - a mu) / (a^2 var + 1 - a^2), x_t the seed's noise."""
    m, mu, embed = _setup(layout, name, prediction_type, latent_scale=2.0)
    t, n = 700, 3
    out = m.sample(_conditions(name), n, mode="one_step", t=t, seed=11)
    assert out.shape == (n, layout.num_blocks, layout.block_size)
    assert torch.all(out[:, ~layout.valid_mask] == 0)
    assert m.models["denoiser"].calls == 1                 # every block of every sample: one batched forward
    mu_c = _mu(name, mu)
    x_t = torch.randn(n, *mu_c.shape, generator=torch.Generator().manual_seed(11))
    ab = float(make_scheduler(m.scheduler).alphas_cumprod[t])
    expect = mu_c + ab ** 0.5 * STD ** 2 * (x_t - ab ** 0.5 * mu_c) / (ab * STD ** 2 + 1 - ab)
    got = embed(out)
    if name == "denoised_weights":
        expect = expect * layout.valid_mask
    assert torch.allclose(got, expect, atol=1e-4), float((got - expect).abs().max())


@pytest.mark.parametrize("name", METHODS)
def test_one_step_in_chunks_is_the_same_sample(layout, name):
    m, _, _ = _setup(layout, name, "epsilon")
    whole = m.sample(_conditions(name), 3, mode="one_step", t=600, seed=5)
    calls = m.models["denoiser"].calls
    chunked = m.sample(_conditions(name), 3, mode="one_step", t=600, seed=5, chunk_blocks=7)
    assert torch.allclose(chunked, whole, atol=1e-6)
    if name == "denoised_weights":                         # block rows: ceil(3 * num_blocks / 7) forwards
        assert m.models["denoiser"].calls - calls == -(-3 * layout.num_blocks // 7)


@pytest.mark.parametrize("mode,steps", [("ddim", 50), ("ddpm", 100)])
@pytest.mark.parametrize("name", METHODS)
def test_ddim_and_ddpm_draw_the_data_distribution(layout, name, mode, steps):
    """128 draws vs N(mu_c, 0.5^2) per coordinate: the mean's standard error is 0.5 / sqrt(128) = 0.044
    (mean |error| ~0.035); a zero-mean denoiser gives mean |error| ~0.8, a sampler that does not follow the
    schedule a std far from 0.5 (DDIM with 10 steps: ~0.37)."""
    m, mu, embed = _setup(layout, name, "epsilon")
    n = 128
    x = embed(m.sample(_conditions(name), n, mode=mode, steps=steps, seed=0))
    assert m.models["denoiser"].calls == steps               # one batched forward per step
    mu_c = _mu(name, mu)
    real = layout.valid_mask if name == "denoised_weights" else torch.ones_like(mu_c, dtype=torch.bool)
    assert float((x.mean(0) - mu_c)[real].abs().mean()) < 0.07
    assert abs(float(x.std(0)[real].mean()) - STD) < 0.04
    # conditioned methods: another condition gives that condition's mean
    if name != "pdiff":
        other = embed(m.sample([CONDITIONS[2]], n, mode=mode, steps=steps, seed=1))
        assert float((other.mean(0) - mu[2])[real].abs().mean()) < 0.07


def test_one_step_recover_inverts_forward_noising_and_bad_requests_are_named():
    x0, eps = torch.randn(4, 16), torch.randn(4, 16)
    a = 0.37
    x_t = a ** 0.5 * x0 + (1 - a) ** 0.5 * eps
    assert torch.allclose(one_step_recover(x_t, eps, a), x0, atol=1e-5)
    v = a ** 0.5 * eps - (1 - a) ** 0.5 * x0                     # diffusers' get_velocity
    assert torch.allclose(one_step_recover(x_t, v, a, "v_prediction"), x0, atol=1e-5)
    assert torch.equal(one_step_recover(x_t, x0, a, "sample"), x0)
    with pytest.raises(GeneratorError, match="prediction_type"):
        one_step_recover(x_t, v, a, "flow")
    cfg = SchedulerConfig(num_train_timesteps=100)
    with pytest.raises(GeneratorError, match="t: 100 is outside"):
        check_sampling(cfg, "one_step", 100, 1)
    with pytest.raises(GeneratorError, match="steps: 101"):
        check_sampling(cfg, "ddim", 0, 101)
    with pytest.raises(GeneratorError, match="mode: 'euler'"):
        check_sampling(cfg, "euler", 0, 1)
    with pytest.raises(GeneratorError, match="scheduler.*beta_sched"):
        SchedulerConfig.from_mapping({"beta_sched": "linear"})
    with pytest.raises(GeneratorError, match="scheduler.prediction_type"):
        SchedulerConfig.from_mapping({"prediction_type": "flow"})


def test_scheduler_config_is_ddpm_scheduler_keywords():
    import inspect

    from diffusers import DDPMScheduler

    params = set(inspect.signature(DDPMScheduler.__init__).parameters) - {"self"}
    assert set(SchedulerConfig().to_dict()) <= params
    made = make_scheduler(SchedulerConfig(prediction_type="v_prediction", num_train_timesteps=50))
    assert made.config.prediction_type == "v_prediction" and made.config.num_train_timesteps == 50
    assert made.config.clip_sample is False               # generated weights are never squashed
