"""Memorisation (Zeng et al. 2025): a replaying sampler is flagged, fresh well-fitted models are not."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from rayweights.evaluation.memorisation import (average_baseline, baselines, gaussian_baseline, memorisation_study,
                                                noise_baseline, novelty)

pytestmark = pytest.mark.usefixtures("torch_one_thread")
ROOT = os.path.join(os.path.dirname(__file__), "..")


@pytest.fixture(scope="module")
def subsets_zoo(tmp_path_factory):
    """One 5-class digits task, 6 MLP members trained from scratch (different seeds), 2 kept epochs."""
    from rayweights.config import load_config
    from rayweights.zoo import ZooSpec, build_zoo

    uri = str(tmp_path_factory.mktemp("mem") / "zoo")
    spec = load_config(ZooSpec, os.path.join(ROOT, "jobs", "specs", "tiny.yaml"),
                       ['tasks=["digits:3,5,7,8,9"]', "held_out=[]", "members_per_task=6", "keep_last=2",
                        "hparams.epochs=[4, 5]", f"output={uri}"])
    build_zoo(spec, use_ray=False, progress=False)
    return uri


def test_novelty_is_one_minus_the_best_wrong_set_iou():
    t = np.array([0, 1, 2, 3])
    train = [np.array([1, 1, 2, 3]), np.array([0, 0, 0, 3])]          # wrong {0}, {1, 2}
    s = [np.array([1, 1, 2, 3]), np.array([0, 0, 2, 0]), np.array([0, 1, 2, 3])]
    assert novelty(s, train, t).tolist() == pytest.approx([0.0, 1 - 1 / 3, 1.0])
    # leave-one-group-out: a sample never matches its own group
    assert novelty(s[:1], train, t, ["a"], ["a", "b"]).tolist() == pytest.approx([1.0])


@pytest.mark.slow
def test_baselines_are_built_from_the_training_checkpoints(subsets_zoo):
    from rayweights.evaluation.diagnostics import zoo_weights
    from rayweights.table import open_zoo

    zoo = open_zoo(subsets_zoo)
    L = zoo.layout
    z, _ = zoo_weights(zoo)
    z = z.float()
    mask = L.valid_mask.reshape(1, -1)
    avg = average_baseline(z, L, k=16, draws=5)
    assert avg.shape == (5, z.shape[1]) and torch.allclose(avg, z.mean(0, keepdim=True))   # 12 rows < 16: all
    nb = noise_baseline(z, L, 0.0, 7)
    assert (torch.cdist(nb, z).min(1).values == 0).all()                 # sigma 0 = replay
    g = gaussian_baseline(z, L, 4000)
    se = z.std(0, unbiased=False) / 4000 ** 0.5                           # per-coordinate standard error
    assert ((g.mean(0) - z.mean(0)).abs() <= 5 * se + 1e-6).all()
    assert torch.allclose(g.std(0), z.std(0, unbiased=False), rtol=0.1, atol=1e-6)
    assert ((g * ~mask.bool()) == 0).all()
    names = set(baselines(z, L, n=3, sigmas=(0.01, 0.1)))
    assert names == {"noise σ=0.01", "noise σ=0.1", "average of 16", "gaussian"}


@pytest.mark.slow
def test_replaying_sampler_is_memorising_and_fresh_models_are_not(subsets_zoo, tmp_path):
    from rayweights.evaluation import make_adapter
    from rayweights.evaluation.diagnostics import zoo_weights
    from rayweights.table import open_zoo

    zoo = open_zoo(subsets_zoo)
    z, groups = zoo_weights(zoo)
    g = np.asarray(groups)
    fresh_members = sorted(set(groups))[-2:]                       # two members held out of "training"
    train = torch.from_numpy(~np.isin(g, fresh_members))
    ad = make_adapter("dataset-subsets", zoo.conditions()[0], zoo)
    replay = z[train][torch.randperm(int(train.sum()), generator=torch.Generator().manual_seed(0))[:6]]
    res = memorisation_study(ad, zoo.layout, z[train], {"replay": replay, "fresh": z[~train]},
                             train_groups=list(g[train.numpy()]), n=12, sigmas=(0.01, 1.0))
    assert res.reference_novelty > 0.2                              # SGD runs from other seeds err differently
    assert res.get("replay").summary()["novelty_median"] == 0.0 and res.memorising("replay")
    assert not res.memorising("fresh")
    assert res.get("fresh").summary()["acc_avg"] > 0.85              # well fitted, not novel by being broken
    # tiny noise is a copy; large noise is novel but hurts accuracy
    small, big = res.get("noise σ=0.01").summary(), res.get("noise σ=1").summary()
    assert res.memorising("noise σ=0.01") and big["novelty_median"] > small["novelty_median"]
    assert big["acc_avg"] < small["acc_avg"]
    png = res.plot(str(tmp_path / "mem.png"))
    assert os.path.getsize(png) > 10_000
    assert "| replay | generated |" in res.table()
    assert res.to_dict()["methods"]["replay"]["memorising"] is True
    # the evaluation report carries the section and the scatter
    from rayweights.evaluation.report import write_report

    md = write_report([], str(tmp_path / "report"), {"zoo": subsets_zoo}, print_table=False, memorisation=[res])
    assert "## Memorisation on seen tasks" in md and "| replay | generated |" in md
    assert os.path.getsize(tmp_path / "report" / "memorisation-digits_3_5_7_8_9.png") > 10_000
    assert "](memorisation-digits_3_5_7_8_9.png)" in md


@pytest.mark.slow
def test_evaluate_runs_the_study_on_seen_tasks(subsets_zoo, tmp_path):
    from rayweights.config import ConfigError
    from rayweights.evaluation.cli import EvaluateConfig, _memorisation_one, validate
    from rayweights.sampling import GaussianWeightSampler
    from rayweights.table import open_zoo

    cond = open_zoo(subsets_zoo).conditions()[0]
    GaussianWeightSampler.fit(subsets_zoo, rank=3).save(str(tmp_path / "gauss"))
    cfg = EvaluateConfig(zoo=subsets_zoo, generator=str(tmp_path / "gauss"), family="dataset-subsets",
                         tasks=[cond], output=str(tmp_path / "out"), memorisation_tasks=[cond],
                         memorisation_samples=8, memorisation_sigmas=[0.1])
    validate(cfg)
    res = _memorisation_one(cfg, cond)
    assert res.task == cond and res.reference_novelty is not None
    assert {m.name for m in res.methods} >= {"zoo (vs other members)", "noise σ=0.1", "average of 16", "gaussian"}
    assert len(res.methods[1].accuracy) == 8
    with pytest.raises(ConfigError, match="memorisation_tasks"):
        validate(EvaluateConfig(**{**cfg.__dict__, "memorisation_tasks": ["digits:0,1,2,3,4"]}))
