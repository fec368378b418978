import json
import os

import pytest
import torch

from evalkit import DigitsTask, make_mlp, tiny_zoo
from rayweights.blocks import LayoutError
from rayweights.config import ConfigError, load_config
from rayweights.evaluation.protocols import load_layout_params
from rayweights.sampling import (FolderSampler, GaussianWeightSampler, GeneratorSampler, SampleConfig,
                                 SamplingError, condition_seed, condition_slug, load_sampler, load_state_dict,
                                 main, reassemble, sample_weights)
from rayweights.table import open_zoo


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def zoo_uri(tmp_path_factory):
    return tiny_zoo(tmp_path_factory)


@pytest.fixture(scope="module")
def gaussian_export(zoo_uri, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("gauss") / "export")
    GaussianWeightSampler.fit(zoo_uri, rank=4).save(out)
    return out


# ----------------------------------------------------------------------------- reassembly
def test_reassemble_exact_and_strict_load(zoo_uri):
    zoo = open_zoo(zoo_uri)
    step, sd = zoo.state_dicts("t0-s0")[-1]
    L = zoo.layout
    raw = L.tokenize(sd)
    back = reassemble(raw, L, normalized=False)
    assert all(torch.equal(back[k], sd[k]) for k in sd)                      # bit-exact
    Ls = L.fit_stats(zoo.blocks())
    back_n = reassemble(Ls.normalize(raw), Ls, normalized=True)
    assert all(torch.allclose(back_n[k], sd[k], atol=1e-6) for k in sd)   # normalisation undone
    model = make_mlp(123)
    load_layout_params(model, back, L)
    assert all(torch.equal(model.state_dict()[k], sd[k]) for k in sd)
    with pytest.raises(LayoutError, match="0.weight: missing"):
        load_layout_params(model, {k: v for k, v in back.items() if k != "0.weight"}, L)
    with pytest.raises(LayoutError, match="extra"):
        load_layout_params(model, {**back, "extra": torch.zeros(1)}, L)
    bad = dict(back, **{"2.bias": torch.zeros(3)})
    with pytest.raises(LayoutError, match="2.bias: shape"):
        load_layout_params(model, bad, L)


def test_condition_slug_and_seed():
    assert condition_slug(None) == "unconditional"
    a, b = condition_slug("digits:0,1"), condition_slug("digits/0,1")
    assert a != b and "/" not in a + b and a.startswith("digits_0_1-")
    assert condition_seed(0, "x") == condition_seed(0, "x") != condition_seed(1, "x")


# ----------------------------------------------------------------------------- Gaussian baseline sampler
def test_gaussian_sampler_shapes_conditions_and_round_trip(zoo_uri, gaussian_export):
    g = GaussianWeightSampler.fit(zoo_uri, rank=4)
    L = g.layout
    s = g.sample("digits:0,1,2,3,4", 5, seed=3)
    assert s.shape == (5, L.num_blocks, L.block_size) and g.normalized
    assert torch.all(s[:, ~L.valid_mask] == 0)
    assert torch.equal(s, g.sample("digits:0,1,2,3,4", 5, seed=3))
    assert not torch.equal(s, g.sample("digits:0,1,2,3,4", 5, seed=4))
    # per-condition means: the task's samples are closer to that task's members than to another task's
    zoo = open_zoo(zoo_uri)
    own = L.normalize(zoo.blocks(["t0-s0", "t0-s1", "t0-s2"], last_k=1)).mean(0)
    other = L.normalize(zoo.blocks(["t1-s0", "t1-s1", "t1-s2"], last_k=1)).mean(0)
    m = s.mean(0)
    assert (m - own).norm() < (m - other).norm()
    # unseen / unconditional -> the pooled component
    assert torch.equal(g.sample("never seen", 2, 0), g.sample(None, 2, 0))
    loaded = load_sampler(gaussian_export)
    assert isinstance(loaded, GaussianWeightSampler) and loaded.layout == L
    assert torch.allclose(loaded.sample("digits:0,1,2,3,4", 5, seed=3), s)


# ----------------------------------------------------------------------------- the Ray Data job
def test_sample_weights_job(ray_local, zoo_uri, gaussian_export, tmp_path):
    out = str(tmp_path / "samples")
    conds = ["digits:0,1,2,3,4", "digits:5,6,7,8,9", "a held-out prompt"]
    cfg = SampleConfig(generator=gaussian_export, conditions=conds, num_samples=3, output=out, write_table=True,
                       concurrency=2)
    entries = sample_weights(cfg, show_progress=False)
    assert len(entries) == 9 and all(e["finite"] for e in entries)
    index = json.load(open(os.path.join(out, "samples.json")))
    assert {e["condition"] for e in index["samples"]} == set(conds)
    zoo = open_zoo(zoo_uri)
    g = GaussianWeightSampler.load(gaussian_export)
    # the files are the sampler's draws (per-condition seed), reassembled, and load into the model
    for cond in conds:
        direct = g.sample(cond, 3, condition_seed(0, cond))
        for i in range(3):
            sd = load_state_dict(os.path.join(out, "samples", condition_slug(cond), f"sample-{i:05d}.safetensors"))
            assert set(sd) == set(zoo.layout.param_names)
            assert torch.allclose(zoo.layout.tokenize(sd), g.layout.denormalize(direct[i]), atol=1e-5)
            load_layout_params(make_mlp(0), sd, zoo.layout)
    # the samples as a weight-block table
    table = open_zoo(os.path.join(out, "table"))
    assert len(table) == 9 and table.layout.same_structure(zoo.layout)
    # replay
    fs = load_sampler(out)
    assert isinstance(fs, FolderSampler) and not fs.normalized
    assert fs.sample(conds[0], 2).shape == (2, zoo.layout.num_blocks, zoo.layout.block_size)
    with pytest.raises(SamplingError, match="3 samples, 4 requested"):
        fs.sample(conds[0], 4)
    # a generated init from the tiny zoo's own task is far better than random (sanity, not a claim)
    task = DigitsTask(conds[0], zoo.layout)
    m = make_mlp(0)
    load_layout_params(m, zoo.layout.detokenize(fs.sample(conds[0], 1)[0]), zoo.layout)
    assert task.evaluate(m)["accuracy"] > 0.8


def test_sample_weights_cli_unconditional_and_errors(ray_local, gaussian_export, tmp_path, capsys):
    out = str(tmp_path / "unc")
    assert main(["--set", f"generator={gaussian_export}", "--set", "num_samples=2", "--output", out]) == 0
    index = json.load(open(os.path.join(out, "samples.json")))
    assert [e["condition"] for e in index["samples"]] == [None, None]
    assert os.path.exists(os.path.join(out, "samples", "unconditional", "sample-00001.safetensors"))
    bad = str(tmp_path / "bad")
    assert main(["--set", "generator=/nonexistent/export", "--output", bad]) == 2
    assert "generator" in capsys.readouterr().err and not os.path.exists(bad)
    assert main(["--set", f"generator={gaussian_export}", "--set", "nmu_samples=2", "--output", bad]) == 2
    assert "nmu_samples" in capsys.readouterr().err
    assert main(["--set", f"generator={gaussian_export}", "--set", "method=euler", "--output", bad]) == 2
    assert "method" in capsys.readouterr().err and not os.path.exists(bad)


@pytest.mark.s3
def test_sample_weights_to_s3_and_replay(ray_local, s3_uri, gaussian_export, zoo_uri):
    out = s3_uri.replace("/zoos/test", "/samples")
    entries = sample_weights(SampleConfig(generator=gaussian_export, conditions=["digits:0,1,2,3,4"], num_samples=2,
                                          output=out), show_progress=False)
    assert len(entries) == 2
    fs = load_sampler(out)
    L = open_zoo(zoo_uri).layout
    direct = GaussianWeightSampler.load(gaussian_export).sample("digits:0,1,2,3,4", 2,
                                                                condition_seed(0, "digits:0,1,2,3,4"))
    assert torch.allclose(fs.sample("digits:0,1,2,3,4", 2), fs.layout.denormalize(direct) * L.valid_mask, atol=1e-5)


# ----------------------------------------------------------------------------- real generator exports
@pytest.fixture(scope="module")
def generator_exports(zoo_uri, tmp_path_factory):
    """Untrained tiny exports of rayweights.generators (format and plumbing, not quality): a
    text-conditioned BlockUNet1D (condition cache of fixed embeddings) and an unconditional p-diff."""
    from rayweights.conditioning import ConditionCache
    from rayweights.generators import build_method

    zoo = open_zoo(zoo_uri)
    L = zoo.layout.fit_stats(zoo.blocks())
    root = tmp_path_factory.mktemp("gens")
    conds = zoo.conditions()
    cache = ConditionCache(conds, torch.randn(len(conds), 16, generator=torch.Generator().manual_seed(0)), "text",
                           "fixed-random")
    dw = build_method("denoised_weights", L, "tiny", conditions=cache)
    dw.save_pretrained(str(root / "dw"))
    cfg = build_method("denoised_weights", L, "tiny", conditions=cache, cond_dropout=0.1)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():           # an untrained BlockUNet1D outputs zeros (zero conv_out): make the condition matter
        for p in cfg.model("denoiser").parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    cfg.save_pretrained(str(root / "dw_cfg"))
    pd = build_method("pdiff", L, "tiny")
    pd.fit_latent_scale(zoo.blocks().reshape(-1, L.num_blocks * L.block_size))
    pd.save_pretrained(str(root / "pdiff"))
    return {"dw": str(root / "dw"), "dw_cfg": str(root / "dw_cfg"), "pdiff": str(root / "pdiff"),
            "conditions": conds}


@pytest.mark.parametrize("method,steps", [("one_step", 1), ("ddim", 3)])
def test_generator_export_samples_load_into_target(ray_local, zoo_uri, generator_exports, tmp_path, method, steps):
    zoo = open_zoo(zoo_uri)
    conds = generator_exports["conditions"][:2]
    s = load_sampler(generator_exports["dw"], method, t=600, steps=steps, device="cpu")
    assert isinstance(s, GeneratorSampler) and s.normalized and s.layout.same_structure(zoo.layout)
    out = str(tmp_path / method)
    entries = sample_weights(SampleConfig(generator=generator_exports["dw"], conditions=conds, num_samples=2,
                                          method=method, t=600, steps=steps, output=out), show_progress=False)
    assert len(entries) == 4
    direct = s.sample(conds[1], 2, condition_seed(0, conds[1]))
    for i in range(2):
        sd = load_state_dict(os.path.join(out, "samples", condition_slug(conds[1]), f"sample-{i:05d}.safetensors"))
        model = make_mlp(5)
        load_layout_params(model, sd, zoo.layout)                                   # strict on the layout
        assert torch.allclose(zoo.layout.tokenize(sd), s.layout.denormalize(direct[i]) * zoo.layout.valid_mask,
                              atol=1e-5)
        assert model(torch.zeros(2, 64)).shape == (2, 10)
    # the unconditional p-diff export, one-step
    p = load_sampler(generator_exports["pdiff"], "one_step", t=500)
    b = p.sample(None, 3, seed=0)
    assert b.shape == (3, zoo.layout.num_blocks, zoo.layout.block_size) and bool(torch.isfinite(b).all())
    load_layout_params(make_mlp(0), reassemble(b[0], p.layout, p.normalized), zoo.layout)


def test_guidance_scale_is_validated_and_needs_cond_dropout(generator_exports, gaussian_export):
    with pytest.raises(ConfigError, match="guidance_scale: must be >= 0"):
        load_config(SampleConfig, None, ["generator=g", "guidance_scale=-1"])
    assert load_config(SampleConfig, None, ["guidance_scale=2.5"]).guidance_scale == 2.5
    # the dw export was saved without cond_dropout: it never learned the null condition
    with pytest.raises(SamplingError, match="guidance_scale: .*cond_dropout"):
        load_sampler(generator_exports["dw"], "one_step", guidance_scale=2.0, device="cpu")
    with pytest.raises(SamplingError, match="guidance_scale: .*generator export"):
        load_sampler(gaussian_export, guidance_scale=2.0)
    assert load_sampler(generator_exports["dw"], "one_step", guidance_scale=1.0, device="cpu").guidance_scale == 1.0


def test_sample_weights_job_applies_guidance(ray_local, generator_exports, tmp_path):
    """The job's actors sample with the config's guidance_scale: the files equal the direct guided sample,
    and differ from the unguided one (the export was trained with cond_dropout > 0)."""
    cond = generator_exports["conditions"][0]
    files = {}
    for scale in (1.0, 3.0):
        out = str(tmp_path / f"s{scale}")
        sample_weights(SampleConfig(generator=generator_exports["dw_cfg"], conditions=[cond], num_samples=2,
                                    method="one_step", t=600, guidance_scale=scale, output=out), show_progress=False)
        files[scale] = [load_state_dict(os.path.join(out, "samples", condition_slug(cond), f"sample-{i:05d}.safetensors"))
                        for i in range(2)]
    s = load_sampler(generator_exports["dw_cfg"], "one_step", t=600, device="cpu", guidance_scale=3.0)
    direct = s.layout.denormalize(s.sample(cond, 2, condition_seed(0, cond))) * s.layout.valid_mask
    for i in range(2):
        assert torch.allclose(s.layout.tokenize(files[3.0][i]), direct[i], atol=1e-5)
        assert not all(torch.equal(files[1.0][i][k], files[3.0][i][k]) for k in files[1.0][i])


def test_token_conditioned_export_samples_per_prompt(zoo_uri, tmp_path):
    """A Denoised Weights export with condition_mode tokens (packaged MiniLM, token states in its cache)
    through the sampler: prompts sample their own weights, guidance scale 0 is the one null condition,
    and a prompt the cache lacks is encoded with its tokens."""
    from rayweights.generators import build_method

    zoo = open_zoo(zoo_uri)
    L = zoo.layout.fit_stats(zoo.blocks())
    conds = zoo.conditions()
    m = build_method("denoised_weights", L, "tiny", text_encoder="default", cond_dropout=0.1,
                     model_overrides={"denoiser": {"condition_mode": "tokens"}})
    m.build_condition_cache(conds, "default")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():           # an untrained BlockUNet1D outputs zeros (zero conv_out): make the condition matter
        for p in m.model("denoiser").parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    m.save_pretrained(str(tmp_path / "dw_tokens"))
    s = load_sampler(str(tmp_path / "dw_tokens"), "one_step", t=600, device="cpu")
    assert s.method.uses_tokens and s.method.conditions.has_tokens
    a, b = s.sample(conds[0], 2, 7), s.sample(conds[1], 2, 7)
    assert bool(torch.isfinite(a).all()) and not torch.allclose(a, b, atol=1e-3)     # the prompt reaches the samples
    assert torch.equal(s.sample(conds[0], 2, 7), a)                     # deterministic per seed
    null = load_sampler(str(tmp_path / "dw_tokens"), "one_step", t=600, device="cpu", guidance_scale=0.0)
    assert torch.equal(null.sample(conds[0], 2, 7), null.sample(conds[1], 2, 7))
    unseen = s.sample("a prompt the zoo never saw", 2, 7)
    assert bool(torch.isfinite(unseen).all()) and not torch.allclose(unseen, a)
    assert "a prompt the zoo never saw" in s.method.conditions and s.method.conditions.has_tokens
