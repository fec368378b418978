"""Generator models and methods, in one process (no Ray): each method overfits a tiny table, every
model class round-trips through save_pretrained/from_pretrained, exports load back identical, and
bad input is refused with an error that names what is wrong."""

from __future__ import annotations

import json
import os

import pytest
import torch

from rayweights.blocks import WeightLayout
from rayweights.conditioning import ConditionCache, SetTransformer, TextEncoder, TokenCondition, default_text_encoder_path
from rayweights.generators import (BlockUNet1D, GeneratorError, GeneratorMethod, GeneratorState, LatentDenoiser1D,
                                   PDiffAutoencoder, WeightVAE, build_method, count_parameters, get_preset,
                                   is_generator_export, list_presets, load_generator)
from rayweights.generators.presets import UnknownPresetError
from rayweights.table import open_zoo
from tests.genkit import CONDITIONS, mlp_state_dict, tiny_table

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return open_zoo(tiny_table(str(tmp_path_factory.mktemp("gen") / "zoo"), members=3, checkpoints=2))


@pytest.fixture(scope="module")
def layout(zoo):
    return zoo.layout.fit_stats(zoo.blocks())


def _fake_cache(conditions=CONDITIONS, dim=12):
    """Well-separated condition embeddings (no text encoder needed in unit tests)."""
    emb = torch.eye(len(conditions), dim) * 3.0
    return ConditionCache(list(conditions), emb, "text", "test")


def _block_batch(zoo, names):
    members = zoo.members.to_pylist()
    blocks, conds = [], []
    for m in members:
        b = zoo.blocks([m["member_id"]])                     # [checkpoints, nb, bs]
        blocks.append(b)
        conds += [names.index(m["condition"])] * b.shape[0]
    w = torch.cat(blocks)
    return w, torch.tensor(conds)


def _train(method, stage, make_batch, steps, lr=3e-3):
    module = method.trainer_module(stage)
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr)
    torch.manual_seed(0)
    losses = []
    for _ in range(steps):
        loss = module(**method.prepare(stage, make_batch(), "cpu"))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def _mean(xs):
    return sum(xs) / len(xs)


# ----------------------------------------------------------------------------- presets
def test_presets_cover_every_method_and_unknown_is_named():
    for m in ("denoised_weights", "pdiff", "d2nwg"):
        assert {"tiny", "small", "base", "large", "xl"} <= set(list_presets(m))
    with pytest.raises(UnknownPresetError, match="huge"):
        get_preset("pdiff", "huge")
    with pytest.raises(UnknownPresetError, match="nope"):
        get_preset("nope", "tiny")


def test_base_preset_is_about_100m_parameters():
    cfg = get_preset("denoised_weights", "base")["denoiser"]
    n = count_parameters(BlockUNet1D(**cfg, block_size=256, cross_attention_dim=384))
    assert 80e6 < n < 140e6


# ----------------------------------------------------------------------------- model round trips
MODELS = [
    (BlockUNet1D, dict(get_preset("denoised_weights", "tiny")["denoiser"], block_size=16, cross_attention_dim=12),
     lambda: (torch.randn(5, 16), torch.randint(0, 1000, (5,)), torch.randint(0, 4, (5,)), torch.randn(5, 12))),
    (BlockUNet1D, dict(get_preset("denoised_weights", "tiny")["denoiser"], block_size=16, cross_attention_dim=12,
                       condition_mode="tokens", pooled_dim=7),
     lambda: (torch.randn(5, 16), torch.randint(0, 1000, (5,)), torch.randint(0, 4, (5,)), torch.randn(5, 6, 12),
              torch.arange(6).expand(5, 6) < torch.tensor([[1], [6], [3], [2], [6]]), torch.randn(5, 7))),
    (PDiffAutoencoder, dict(get_preset("pdiff", "tiny")["autoencoder"], in_dim=96), lambda: (torch.randn(3, 96),)),
    (LatentDenoiser1D, dict(get_preset("pdiff", "tiny")["denoiser"], latent_channels=4, latent_length=8, cond_dim=0),
     lambda: (torch.randn(3, 4, 8), torch.randint(0, 1000, (3,)))),
    (WeightVAE, dict(get_preset("d2nwg", "tiny")["vae"], in_dim=96), lambda: (torch.randn(3, 96),)),
    (SetTransformer, dict(get_preset("d2nwg", "tiny")["dataset_encoder"], in_dim=20, weight_dim=32),
     lambda: (torch.randn(2, 3, 5, 20),)),
]


@pytest.mark.parametrize("cls,kwargs,inputs", MODELS,
                         ids=[m[0].__name__ + ("-tokens" if m[1].get("condition_mode") == "tokens" else "")
                              for m in MODELS])
def test_model_save_load_round_trip(tmp_path, cls, kwargs, inputs):
    torch.manual_seed(0)
    model = cls(**kwargs).eval()
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    assert os.path.exists(tmp_path / "config.json")
    assert any(f.endswith(".safetensors") for f in os.listdir(tmp_path))
    again = cls.from_pretrained(str(tmp_path)).eval()
    for k, v in kwargs.items():
        got = again.config[k]
        assert (list(got) if isinstance(got, tuple) else got) == (list(v) if isinstance(v, tuple) else v), k
    x = inputs()
    with torch.no_grad():
        a = model(*x) if cls is not WeightVAE else model.encode(*x)[0]
        b = again(*x) if cls is not WeightVAE else again.encode(*x)[0]
    a = a[0] if isinstance(a, tuple) else a
    b = b[0] if isinstance(b, tuple) else b
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- methods overfit
def test_denoised_weights_overfits_and_samples_condition_specific_weights(zoo, layout):
    """v-prediction (the tiny configs' choice, see bench/bench_prediction_type.py): the loss falls
    below 0.8 within 400 steps and one-step samples near the noise side are condition-specific."""
    names = list(CONDITIONS)
    method = build_method("denoised_weights", layout, "tiny", conditions=_fake_cache(names),
                          scheduler={"prediction_type": "v_prediction"})
    w, cond = _block_batch(zoo, names)
    nb = layout.num_blocks
    blocks = w.reshape(-1, layout.block_size)
    bidx = torch.arange(nb).repeat(w.shape[0])
    cid = cond.repeat_interleave(nb)

    def batch():
        return {"block": blocks, "block_index": bidx, "cond_id": cid}

    losses = _train(method, "diffusion", batch, 400, lr=3e-3)
    assert _mean(losses[-40:]) < 0.8 and _mean(losses[-40:]) < 0.85 * _mean(losses[:20]), (losses[:5], losses[-5:])
    # one-step recovery at t=800: samples lie nearer their own condition's mean weights (chance 1/3)
    x = method.sample(names, num_samples=4, mode="one_step", t=800, seed=0)
    assert x.shape == (12, nb, layout.block_size)
    samples = layout.denormalize(x).reshape(12, -1)
    target = torch.stack([w[cond == i].mean(0) for i in range(len(names))]).reshape(3, -1)
    nearest = torch.cdist(samples, target).argmin(1)
    assert int((nearest == torch.arange(3).repeat_interleave(4)).sum()) >= 8, nearest
    # DDIM also runs and is deterministic per seed
    a = method.sample(names[:1], 1, mode="ddim", steps=5, seed=3)
    b = method.sample(names[:1], 1, mode="ddim", steps=5, seed=3)
    assert torch.equal(a, b)


def test_pdiff_autoencoder_and_latent_diffusion_learn(zoo, layout):
    method = build_method("pdiff", layout, "tiny")
    w, _ = _block_batch(zoo, list(CONDITIONS))
    flat = w.reshape(w.shape[0], -1)

    def batch():
        return {"weights": flat, "cond_id": torch.zeros(len(flat), dtype=torch.long)}

    ae = _train(method, "autoencoder", batch, 300, lr=3e-3)
    assert _mean(ae[-20:]) < 0.3 * _mean(ae[:10])
    scale = method.fit_latent_scale(flat)
    assert scale > 0
    dif = _train(method, "diffusion", batch, 300, lr=3e-3)
    assert _mean(dif[-30:]) < _mean(dif[:10])
    x = method.sample(None, num_samples=4, mode="ddim", steps=10, seed=0)
    assert x.shape == (4, layout.num_blocks, layout.block_size) and torch.isfinite(x).all()
    # samples decode near the training weights (the zoo is three tight clusters)
    samples = layout.denormalize(x).reshape(4, -1)
    nn_dist = torch.cdist(samples, flat).min(1).values
    spread = torch.cdist(flat, flat).max()
    assert float(nn_dist.max()) < float(spread)


def test_d2nwg_stages_learn_and_condition_on_datasets(zoo, layout):
    names = list(CONDITIONS)
    method = build_method("d2nwg", layout, "tiny", condition_names=names, dataset_options={"samples_per_class": 4})
    bank = method.build_features_bank()
    assert bank.shape[:3] == (3, 3, 4)                       # 3 datasets x 3 classes x 4 samples
    w, cond = _block_batch(zoo, names)
    flat = w.reshape(w.shape[0], -1)

    def batch():
        return {"weights": flat, "cond_id": cond}

    vae = _train(method, "vae", batch, 300, lr=3e-3)
    assert _mean(vae[-20:]) < 0.3 * _mean(vae[:10])
    method.fit_latent_scale(flat)
    enc = _train(method, "dataset_encoder", batch, 150, lr=1e-3)
    assert _mean(enc[-10:]) < _mean(enc[:10])
    cache = method.build_condition_cache()
    assert cache.conditions == names and cache.embeddings.shape[0] == 3
    dif = _train(method, "diffusion", batch, 200, lr=3e-3)
    assert _mean(dif[-20:]) < _mean(dif[:10])
    x = method.sample(names[:2], num_samples=2, mode="ddim", steps=10, seed=0)
    assert x.shape == (4, layout.num_blocks, layout.block_size) and torch.isfinite(x).all()
    # an unseen dataset is encoded on the fly with the frozen Set Transformer
    y = method.sample(["digits:1,5,9"], num_samples=1, mode="ddim", steps=5, seed=0)
    assert torch.isfinite(y).all() and "digits:1,5,9" in method.conditions


# ----------------------------------------------------------------------------- export round trip
@pytest.mark.parametrize("name", ["denoised_weights", "pdiff", "d2nwg"])
def test_export_round_trip_samples_identically(tmp_path, layout, name):
    kwargs = {"denoised_weights": dict(conditions=_fake_cache()), "pdiff": {},
              "d2nwg": dict(condition_names=list(CONDITIONS), dataset_options={"samples_per_class": 3})}[name]
    method = build_method(name, layout, "tiny", **kwargs)
    if name == "d2nwg":
        method.build_features_bank()
        method.build_condition_cache()
    if name != "denoised_weights":
        method.latent_scale = 0.7
    for key in method.model_class:
        method.model(key)
    method.save_pretrained(str(tmp_path / "export"))
    meta = json.loads((tmp_path / "export" / "generator.json").read_text())
    assert meta["method"] == name and meta["format_version"].startswith("rayweights.generator/")
    again = load_generator(str(tmp_path / "export"))
    assert type(again) is type(method) and again.layout.same_structure(layout)
    conds = None if name == "pdiff" else CONDITIONS[:2]
    a = method.sample(conds, 2, mode="ddim", steps=3, seed=1)
    b = again.sample(conds, 2, mode="ddim", steps=3, seed=1)
    assert torch.allclose(a, b, atol=1e-6)
    # the state the Ray Train workers get is the state the export holds
    st, models = GeneratorState.read(str(tmp_path / "export"))
    assert set(models) == set(method.model_class) and st.scheduler == method.scheduler
    assert st.json_fields() == method.to_state().json_fields()
    # the sampling stage recognises it
    assert is_generator_export(str(tmp_path / "export")) and not is_generator_export(str(tmp_path))


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_are_named(tmp_path, layout, zoo):
    with pytest.raises(GeneratorError, match="unknown method"):
        build_method("gan", layout)
    raw = WeightLayout.from_state_dict(mlp_state_dict(0, 0, 0), rule=1, block_size=16)
    with pytest.raises(GeneratorError, match="stats"):
        build_method("pdiff", raw)
    with pytest.raises(GeneratorError, match="model.*unknown"):
        build_method("pdiff", layout, model_overrides={"unet": {}})
    with pytest.raises(GeneratorError, match="model.autoencoder.chanels: not a keyword of PDiffAutoencoder"):
        build_method("pdiff", layout, model_overrides={"autoencoder": {"chanels": [4, 4]}})
    with pytest.raises(GeneratorError, match="scheduler.prediction_type"):
        build_method("pdiff", layout, scheduler={"prediction_type": "flow"})
    # a generator config whose block size disagrees with the table's
    with pytest.raises(GeneratorError, match="block_size"):
        build_method("denoised_weights", layout, model_overrides={"denoiser": {"block_size": 32}},
                     conditions=_fake_cache())
    m = build_method("pdiff", layout)
    with pytest.raises(GeneratorError, match="weights"):
        m.prepare("autoencoder", {"block": torch.zeros(2, 16)})
    with pytest.raises(GeneratorError, match="length"):
        m.prepare("autoencoder", {"weights": torch.zeros(2, 7)})
    with pytest.raises(GeneratorError, match="latent_scale"):
        m.sample(None, 1, mode="ddim", steps=2)
    with pytest.raises(GeneratorError, match="stage"):
        m.trainer_module("vae")
    d = build_method("denoised_weights", layout, conditions=_fake_cache())
    with pytest.raises(GeneratorError, match="mode"):
        d.sample(CONDITIONS[:1], 1, mode="euler")
    with pytest.raises(GeneratorError, match="t: "):
        d.sample(CONDITIONS[:1], 1, mode="one_step", t=5000)
    with pytest.raises(GeneratorError, match="condition is required"):
        d.sample([None], 1)
    with pytest.raises(GeneratorError, match="not a generator export"):
        load_generator(str(tmp_path))
    os.makedirs(tmp_path / "bad")
    (tmp_path / "bad" / "generator.json").write_text(json.dumps({"format_version": "other/9", "method": "pdiff"}))
    (tmp_path / "bad" / "layout.json").write_text(layout.to_json())
    with pytest.raises(GeneratorError, match="format_version"):
        load_generator(str(tmp_path / "bad"))


def test_pdiff_data_stats_travel_with_the_state_and_the_export(tmp_path, zoo, layout):
    """p-diff's fitted input standardisation and latent mean reach the workers (to_state) and the
    export; standardised inputs have zero mean and unit std per coordinate over the zoo."""
    w, _ = _block_batch(zoo, list(CONDITIONS))
    flat = w.reshape(w.shape[0], -1)
    m = build_method("pdiff", layout, "tiny")
    m.fit_input_stats(flat)
    x = m.prepare("autoencoder", {"weights": flat, "cond_id": torch.zeros(len(flat), dtype=torch.long)})["x0"]
    real = layout.valid_mask.reshape(-1)
    assert torch.allclose(x[:, real].mean(0), torch.zeros(int(real.sum())), atol=1e-4)
    assert torch.allclose(x[:, real].std(0, unbiased=False), torch.ones(int(real.sum())), atol=1e-3)
    assert (x[:, ~real] == 0).all()
    m.fit_latent_scale(flat)
    z = m.prepare("diffusion", {"weights": flat, "cond_id": torch.zeros(len(flat), dtype=torch.long)})["x0"]
    assert abs(float(z.mean())) < 1e-4 and float(z.std(unbiased=False)) == pytest.approx(1.0, rel=0.05)
    back = GeneratorMethod.from_state(m.to_state())
    assert set(back.data_stats) == {"input_mean", "input_std", "latent_mean"}
    m.save_pretrained(str(tmp_path / "exp"))
    loaded = load_generator(str(tmp_path / "exp"))
    for k, v in m.data_stats.items():
        assert torch.equal(loaded.data_stats[k], v)
    assert torch.equal(loaded.sample(None, 2, mode="ddim", steps=3, seed=1), m.sample(None, 2, mode="ddim", steps=3, seed=1))
    # the reconstruction API works in raw weight space
    assert m.reconstruct(flat).shape == flat.shape


def test_exports_written_before_generator_state_still_load(tmp_path, layout):
    """generator.json as earlier versions wrote it (the scheduler as six DDPMScheduler keywords, no
    data stats) loads into the same generator and samples the same weights."""
    method = build_method("pdiff", layout, "tiny")
    method.latent_scale = 0.5
    for key in method.model_class:
        method.model(key)
    out = tmp_path / "export"
    method.save_pretrained(str(out))
    meta = json.loads((out / "generator.json").read_text())
    meta["scheduler"] = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=2e-2,
                             prediction_type="epsilon", clip_sample=False)
    assert meta.pop("cond_dropout") == 0.0                   # written since classifier-free guidance
    assert set(meta) == {"format_version", "method", "preset", "models", "model_overrides", "scheduler",
                         "conditioning", "condition_names", "text_encoder", "dataset_options", "latent_scale",
                         "num_blocks", "block_size", "parameters"}
    (out / "generator.json").write_text(json.dumps(meta))
    again = load_generator(str(out))
    assert again.scheduler == method.scheduler and again.latent_scale == 0.5 and again.data_stats == {}
    assert again.cond_dropout == 0.0
    assert torch.equal(again.sample(None, 2, mode="ddpm", steps=4, seed=2), method.sample(None, 2, mode="ddpm", steps=4,
                                                                                           seed=2))
    meta["colour"] = "blue"
    (out / "generator.json").write_text(json.dumps(meta))
    with pytest.raises(GeneratorError, match="unknown field.*colour"):
        load_generator(str(out))


# ----------------------------------------------------------------------------- classifier-free guidance
def _guidable(name, layout, cond_dropout=0.5):
    """An untrained tiny conditioned method that accepts guidance (trained-with-dropout record set)."""
    if name == "denoised_weights":
        return build_method(name, layout, "tiny", conditions=_fake_cache(), cond_dropout=cond_dropout)
    m = build_method(name, layout, "tiny", condition_names=list(CONDITIONS), dataset_options={"samples_per_class": 3},
                     cond_dropout=cond_dropout)
    m.build_features_bank()
    m.build_condition_cache()
    m.latent_scale = 0.7
    return m


def _perturbed(m):
    """Jitter the denoiser's parameters: a fresh one zero-initialises its conditioning path, so
    without this the condition (and the guidance) would not change the output at all."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.model("denoiser").parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return m


@pytest.mark.parametrize("name", ["denoised_weights", "d2nwg"])
@pytest.mark.parametrize("mode", ["one_step", "ddim"])
def test_guidance_scale_zero_is_the_null_condition_and_one_is_the_default(monkeypatch, layout, name, mode):
    m = _perturbed(_guidable(name, layout))
    conds = list(CONDITIONS[:2])
    kw = dict(mode=mode, t=400, steps=4, seed=3)
    plain = m.sample(conds, 2, **kw)
    assert torch.equal(m.sample(conds, 2, guidance_scale=1.0, **kw), plain)
    zero = m.sample(conds, 2, guidance_scale=0.0, **kw)
    assert not torch.equal(zero, plain)                       # the condition matters, so the null differs
    emb = m.encode_conditions(conds)
    monkeypatch.setattr(m, "encode_conditions", lambda c, device="cpu": torch.zeros_like(emb).to(device))
    assert torch.equal(m.sample(conds, 2, **kw), zero)       # = plain sampling with the all-zeros condition


@pytest.mark.parametrize("name", ["denoised_weights", "d2nwg"])
@pytest.mark.parametrize("mode", ["one_step", "ddim"])
def test_guidance_moves_the_sample_along_cond_minus_uncond(layout, name, mode):
    m = _perturbed(_guidable(name, layout))
    kw = dict(mode=mode, t=400, steps=4, seed=5)
    conds = list(CONDITIONS[:2])
    uncond, one, three = (m.sample(conds, 2, guidance_scale=s, **kw) for s in (0.0, 1.0, 3.0))
    assert not torch.allclose(three, one)
    assert float((three - uncond).norm()) > 1.5 * float((one - uncond).norm())
    if name == "denoised_weights" and mode == "one_step":
        # one-step recovery is linear in the model output: exactly uncond + 3 (cond - uncond), from the
        # batched cond/null forward
        torch.testing.assert_close(three, uncond + 3.0 * (one - uncond), atol=1e-4, rtol=1e-4)


def test_guidance_needs_a_generator_trained_with_cond_dropout(layout):
    m = _guidable("denoised_weights", layout, cond_dropout=0.0)
    with pytest.raises(GeneratorError, match="guidance_scale: .*cond_dropout"):
        m.sample(CONDITIONS[:1], 1, guidance_scale=2.0)
    with pytest.raises(GeneratorError, match="guidance_scale: must be >= 0"):
        _guidable("denoised_weights", layout).sample(CONDITIONS[:1], 1, guidance_scale=-1.0)
    p = build_method("pdiff", layout, "tiny")
    p.latent_scale = 1.0
    with pytest.raises(GeneratorError, match="guidance_scale: .*unconditional"):
        p.sample(None, 1, guidance_scale=2.0)
    with pytest.raises(GeneratorError, match="cond_dropout: .*unconditional"):
        build_method("pdiff", layout, "tiny", cond_dropout=0.1)
    with pytest.raises(GeneratorError, match="cond_dropout: must be in"):
        build_method("denoised_weights", layout, "tiny", conditions=_fake_cache(), cond_dropout=1.0)


def _nulled(cond):
    return (cond == 0).all(dim=-1)


@pytest.mark.parametrize("name", ["denoised_weights", "d2nwg"])
def test_cond_dropout_nulls_a_binomial_fraction_of_diffusion_rows(zoo, layout, name):
    w, cond_id = _block_batch(zoo, list(CONDITIONS))
    if name == "denoised_weights":
        nb = layout.num_blocks
        batch = {"block": w.reshape(-1, layout.block_size), "block_index": torch.arange(nb).repeat(w.shape[0]),
                 "cond_id": cond_id.repeat_interleave(nb)}
    else:
        batch = {"weights": w.reshape(w.shape[0], -1), "cond_id": cond_id}
    p = 0.3
    m = _guidable(name, layout, cond_dropout=p)
    table = m.condition_table("cpu")[batch["cond_id"]]
    assert not bool(_nulled(table).any())
    torch.manual_seed(0)
    nulled, total = 0, 0
    for _ in range(60):
        cond = m.prepare("diffusion", batch)["cond"]
        drop = _nulled(cond)
        assert torch.equal(cond[~drop], table[~drop])            # kept rows keep their own condition
        nulled, total = nulled + int(drop.sum()), total + drop.numel()
    tol = 4 * (p * (1 - p) / total) ** 0.5
    assert abs(nulled / total - p) < tol, (nulled / total, total)
    # p = 0: never nulled, and training draws no extra random numbers (today's inputs bit for bit)
    m0 = _guidable(name, layout, cond_dropout=0.0)
    m0.prepare("diffusion", batch)            # builds the frozen first stage (its init draws random numbers)
    torch.manual_seed(1)
    got = [m0.prepare("diffusion", batch) for _ in range(3)]
    after = torch.rand(1)
    torch.manual_seed(1)
    for g in got:
        x0 = m0._normalized("diffusion", batch, "cpu")["x0"]
        if name == "d2nwg":
            x0 = m0._scaled_latents(x0, "cpu")                   # the VAE posterior draw
        assert torch.equal(g["x0"], x0) and torch.equal(g["cond"], m0.condition_table("cpu")[batch["cond_id"]])
    assert torch.equal(torch.rand(1), after)


@pytest.mark.parametrize("name", ["denoised_weights", "d2nwg"])
def test_cond_dropout_travels_with_the_state_and_the_export(tmp_path, layout, name):
    m = _guidable(name, layout, cond_dropout=0.25)
    for key in m.model_class:
        m.model(key)
    assert GeneratorMethod.from_state(m.to_state()).cond_dropout == 0.25        # what the Ray Train workers get
    m.save_pretrained(str(tmp_path / "export"))
    assert json.loads((tmp_path / "export" / "generator.json").read_text())["cond_dropout"] == 0.25
    again = load_generator(str(tmp_path / "export"))
    assert again.cond_dropout == 0.25
    kw = dict(mode="ddim", steps=3, seed=1, guidance_scale=2.5)
    assert torch.allclose(again.sample(CONDITIONS[:2], 2, **kw), m.sample(CONDITIONS[:2], 2, **kw), atol=1e-6)


# ----------------------------------------------------------------------------- token-level text conditioning
def _tokens_unet(**kw):
    cfg = dict(get_preset("denoised_weights", "tiny")["denoiser"], block_size=16, cross_attention_dim=12,
               condition_mode="tokens", pooled_dim=7)
    torch.manual_seed(0)
    m = BlockUNet1D(**{**cfg, **kw}).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():                 # a fresh one zero-initialises conv_out: nothing would reach the output
        for p in m.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return m


def test_block_unet_tokens_mode_masks_padding_and_uses_the_pooled_vector():
    m = _tokens_unet()
    g = torch.Generator().manual_seed(2)
    x, t, n = torch.randn(3, 16, generator=g), torch.tensor([10, 500, 900]), torch.tensor([0, 1, 2])
    tokens, pooled = torch.randn(3, 4, 12, generator=g), torch.randn(3, 7, generator=g)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True], [True, False, False, False]])
    with torch.no_grad():
        ref = m(x, t, n, tokens, mask, pooled)
        # padding tokens (any values, any count) do not change the output
        junk = torch.cat([tokens, 50 * torch.randn(3, 5, 12, generator=g)], 1)
        torch.testing.assert_close(m(x, t, n, junk, torch.cat([mask, torch.zeros(3, 5, dtype=torch.bool)], 1), pooled),
                                   ref, atol=1e-5, rtol=1e-5)
        filled = torch.where(mask[..., None], tokens, 50 * torch.randn(3, 4, 12, generator=g))
        torch.testing.assert_close(m(x, t, n, filled, mask, pooled), ref, atol=1e-5, rtol=1e-5)
        # ... and each row is its own prompt: trimming row 2 to its single token gives its output
        torch.testing.assert_close(m(x[2:], t[2:], n[2:], tokens[2:, :1], None, pooled[2:]), ref[2:], atol=1e-5, rtol=1e-5)
        # the unmasked tokens and the pooled vector both matter
        assert (m(x, t, n, tokens, torch.ones_like(mask), pooled) - ref)[0].abs().max() > 1e-3
        assert (m(x, t, n, tokens, mask, pooled + 1.0) - ref).abs().max() > 1e-3
        # a row with no token at all gives finite output (no all-masked softmax NaN)
        out = m(x, t, n, tokens, torch.zeros_like(mask), pooled)
        assert bool(torch.isfinite(out).all())
    with pytest.raises(ValueError, match="pooled_projections: required"):
        m(x, t, n, tokens, mask)
    with pytest.raises(ValueError, match=r"encoder_hidden_states: condition_mode 'tokens' takes token states"):
        m(x, t, n, torch.randn(3, 12), None, pooled)
    with pytest.raises(ValueError, match="encoder_attention_mask: shape"):
        m(x, t, n, tokens, mask[:, :2], pooled)
    with pytest.raises(ValueError, match="condition_mode: 'sentences'"):
        BlockUNet1D(block_size=16, condition_mode="sentences")


def test_a_pooled_block_unet_saved_before_condition_modes_still_loads(tmp_path):
    cfg = dict(get_preset("denoised_weights", "tiny")["denoiser"], block_size=16, cross_attention_dim=12)
    torch.manual_seed(0)
    m = BlockUNet1D(**cfg).eval()
    m.save_pretrained(str(tmp_path), safe_serialization=True)
    conf = json.loads((tmp_path / "config.json").read_text())
    assert conf.pop("condition_mode") == "pooled" and conf.pop("pooled_dim") is None
    (tmp_path / "config.json").write_text(json.dumps(conf))            # as written before the option existed
    again = BlockUNet1D.from_pretrained(str(tmp_path)).eval()
    assert again.config.condition_mode == "pooled" and again.pooled_embedding is None
    x, t, n, c = torch.randn(4, 16), torch.tensor([5, 50, 500, 900]), torch.tensor([0, 1, 2, 3]), torch.randn(4, 12)
    with torch.no_grad():
        assert torch.equal(again(x, t, n, c), m(x, t, n, c))
    with pytest.raises(ValueError, match="pooled_projections: only taken"):
        m(x, t, n, c, None, torch.randn(4, 12))


def _fake_token_cache(conditions=CONDITIONS, dim=12, pooled_dim=7):
    """Prompts of different lengths (so rows are padded) with separated token states."""
    g = torch.Generator().manual_seed(0)
    rows = [torch.randn(2 + i, dim, generator=g) + 2.0 * i for i in range(len(conditions))]
    tc = TokenCondition.from_rows(rows, torch.eye(len(conditions), pooled_dim) * 3.0)
    return ConditionCache.from_tokens(list(conditions), tc, "text", "test")


def _token_method(layout, cond_dropout=0.5, **kw):
    return build_method("denoised_weights", layout, "tiny", conditions=_fake_token_cache(), cond_dropout=cond_dropout,
                        model_overrides={"denoiser": {"condition_mode": "tokens"}}, **kw)


def test_tokens_mode_fills_widths_from_the_cache_and_refuses_a_pooled_cache(layout):
    m = _token_method(layout)
    cfg = m.model("denoiser").config
    assert (cfg.condition_mode, cfg.cross_attention_dim, cfg.pooled_dim) == ("tokens", 12, 7)
    assert m.model("denoiser").context_proj is None
    with pytest.raises(GeneratorError, match="condition_mode: 'tokens' needs a condition cache with token states"):
        build_method("denoised_weights", layout, "tiny", conditions=_fake_cache(),
                     model_overrides={"denoiser": {"condition_mode": "tokens"}})
    with pytest.raises(GeneratorError, match="model.denoiser.condition_mode: 'words'"):
        build_method("denoised_weights", layout, "tiny", conditions=_fake_cache(),
                     model_overrides={"denoiser": {"condition_mode": "words"}})


def test_tokens_mode_prepare_gathers_states_by_id_and_nulls_a_binomial_fraction(zoo, layout):
    w, cond_id = _block_batch(zoo, list(CONDITIONS))
    nb = layout.num_blocks
    batch = {"block": w.reshape(-1, layout.block_size), "block_index": torch.arange(nb).repeat(w.shape[0]),
             "cond_id": cond_id.repeat_interleave(nb)}
    p = 0.3
    m = _token_method(layout, cond_dropout=p)
    table = m.conditions.token_condition(batch["cond_id"])
    torch.manual_seed(0)
    nulled, total = 0, 0
    for _ in range(40):
        got = m.prepare("diffusion", batch)
        assert set(got) == {"x0", "block_index", "cond", "cond_tokens", "cond_mask"}
        drop = (got["cond"] == 0).all(-1)
        keep = ~drop
        assert torch.equal(got["cond_tokens"][keep], table.tokens[keep]) and torch.equal(got["cond_mask"][keep], table.mask[keep])
        assert torch.equal(got["cond"][keep], table.pooled[keep])
        assert bool((got["cond_tokens"][drop] == 0).all())
        assert bool(got["cond_mask"][drop][:, 0].all()) and not bool(got["cond_mask"][drop][:, 1:].any())
        nulled, total = nulled + int(drop.sum()), total + drop.numel()
    tol = 4 * (p * (1 - p) / total) ** 0.5
    assert abs(nulled / total - p) < tol, (nulled / total, total)
    loss = m.loss("diffusion", batch)                                      # the trainer module takes them
    assert loss.dim() == 0 and bool(torch.isfinite(loss))


PROMPTS = ["a watercolor painting of a quiet harbour", "a neon cyberpunk city at night in the rain"]


@pytest.fixture(scope="module")
def trained_tokens(tmp_path_factory):
    """A token-conditioned tiny Denoised Weights generator trained on a synthetic zoo where each of two
    prompts (encoded by the packaged MiniLM) maps to its own weight vector."""
    zoo = open_zoo(tiny_table(str(tmp_path_factory.mktemp("tok") / "zoo"), conditions=PROMPTS, members=2,
                              checkpoints=2))
    layout = zoo.layout.fit_stats(zoo.blocks())
    method = build_method("denoised_weights", layout, "tiny", text_encoder="default", cond_dropout=0.2,
                          scheduler={"prediction_type": "v_prediction"},
                          model_overrides={"denoiser": {"condition_mode": "tokens"}})
    method.build_condition_cache(PROMPTS, "default")
    w, cond = _block_batch(zoo, PROMPTS)
    nb = layout.num_blocks
    blocks, bidx, cid = w.reshape(-1, layout.block_size), torch.arange(nb).repeat(w.shape[0]), cond.repeat_interleave(nb)
    losses = _train(method, "diffusion", lambda: {"block": blocks, "block_index": bidx, "cond_id": cid}, 300)
    target = torch.stack([w[cond == i].mean(0) for i in range(len(PROMPTS))]).reshape(len(PROMPTS), -1)
    return method, target, losses


def test_token_conditioned_generator_samples_each_prompts_own_weights(trained_tokens):
    method, target, losses = trained_tokens
    assert method.conditions.has_tokens and method.conditions.tokens.shape[1] > 1
    assert _mean(losses[-30:]) < 0.4 * _mean(losses[:20]), (losses[:5], losses[-5:])
    x = method.sample(PROMPTS, num_samples=4, mode="one_step", t=800, seed=0)
    samples = method.layout.denormalize(x).reshape(8, -1)
    d = torch.cdist(samples, target)                                        # [8 samples, 2 targets]
    own = torch.arange(2).repeat_interleave(4)
    assert bool((d.argmin(1) == own).all()), d
    # measurably different: each sample lies within a third of the targets' distance of its own target,
    # and the two prompts' sample means are apart by most of that distance
    sep = float((target[0] - target[1]).norm())
    assert float(d.gather(1, own[:, None]).max()) < sep / 3, d
    gap = float((samples[:4].mean(0) - samples[4:].mean(0)).norm())
    assert gap > 0.75 * sep, (gap, sep)


def test_token_guidance_scale_zero_is_the_null_condition_and_one_is_plain(monkeypatch, trained_tokens):
    method, _, _ = trained_tokens
    kw = dict(mode="ddim", steps=4, seed=3)
    plain = method.sample(PROMPTS, 2, **kw)
    assert torch.equal(method.sample(PROMPTS, 2, guidance_scale=1.0, **kw), plain)
    zero = method.sample(PROMPTS, 2, guidance_scale=0.0, **kw)
    assert not torch.allclose(zero, plain, atol=1e-3)
    # one-step recovery is linear in the model output: scale 3 = null + 3 (cond - null) exactly, from the
    # batched forward of the prompts' tokens and the null tokens together
    one = dict(mode="one_step", t=600, seed=4)
    u, c, three = (method.sample(PROMPTS, 2, guidance_scale=g, **one) for g in (0.0, 1.0, 3.0))
    torch.testing.assert_close(three, u + 3.0 * (c - u), atol=1e-4, rtol=1e-4)
    # scale 0 = plain sampling with the null condition (zero tokens, only position 0 unmasked, zero pooled)
    cond = method.encode_conditions(PROMPTS)
    nulls = method.null_condition(cond)
    monkeypatch.setattr(method, "encode_conditions", lambda c, device="cpu": nulls.to(device))
    assert torch.equal(method.sample(PROMPTS, 2, **kw), zero)
    monkeypatch.undo()
    # the null condition is one condition: the same for either prompt, whatever its padding
    kw0 = dict(kw, guidance_scale=0.0)
    assert torch.equal(method.sample(PROMPTS[1:], 2, **kw0), zero[:2])
    short = TokenCondition(nulls.tokens[:1, :1], nulls.mask[:1, :1], nulls.pooled[:1])   # no padding at all
    monkeypatch.setattr(method, "encode_conditions", lambda c, device="cpu": short.to(device))
    torch.testing.assert_close(method.sample(PROMPTS[:1], 2, **kw), zero[:2], atol=1e-5, rtol=1e-5)


def test_token_conditioned_export_round_trip_and_unseen_prompts(tmp_path, trained_tokens):
    method, _, _ = trained_tokens
    method.save_pretrained(str(tmp_path / "export"))
    again = load_generator(str(tmp_path / "export"))
    assert again.model("denoiser").config.condition_mode == "tokens" and again.uses_tokens
    assert again.conditions.has_tokens and torch.equal(again.conditions.tokens, method.conditions.tokens)
    kw = dict(mode="ddim", steps=3, seed=1, guidance_scale=2.0)
    assert torch.allclose(again.sample(PROMPTS, 2, **kw), method.sample(PROMPTS, 2, **kw), atol=1e-6)
    # an unseen (longer) prompt is encoded with its token states and joins the cache
    unseen = "an extremely detailed pencil drawing of an old lighthouse on a rocky northern coast"
    x = again.sample([unseen, PROMPTS[0]], 1, mode="one_step", t=500)
    assert x.shape == (2, again.layout.num_blocks, again.layout.block_size) and bool(torch.isfinite(x).all())
    ref = TextEncoder(default_text_encoder_path()).encode_tokens([unseen])
    got = again.conditions.lookup_tokens([unseen])
    assert int(got.mask.sum()) == int(ref.mask.sum()) > method.conditions.tokens.shape[1]
    torch.testing.assert_close(got.tokens[got.mask], ref.tokens[ref.mask])
    # the cached prompts still sample as before the cache grew (padding does not matter)
    assert again.conditions.tokens.shape[1] > method.conditions.tokens.shape[1]
    torch.testing.assert_close(again.sample(PROMPTS, 2, **kw), method.sample(PROMPTS, 2, **kw), atol=1e-5, rtol=1e-5)
