"""Quality gate: p-diff trained on a zoo built here reproduces its Table 1 form on the seen task.

The zoo is p-diff's partial setting: one 5-class digits task, a ConvNet-3 base model, 4 members that
train only the last two BatchNorm layers and keep a checkpoint after each of the last 25 steps
(100 checkpoints of 64 weights).  p-diff is trained with the shipped recipe
(``jobs/configs/pdiff_tiny.yaml``, single-process :func:`rayweights.train.train_local`: the same
losses, optimiser and schedule as the Ray Train workers), exported, reloaded through the public
sampling API and sampled with its own multi-step sampler (DDIM, 100 steps; not the one-step shortcut).

Thresholds (p-diff Table 1 form, 100 samples, accuracy on the task's validation split):
* generated best >= zoo best - 0.5 pt, generated average >= 95 % of the zoo's average;
* per-tensor mean/std of the samples inside the zoo's range, no invalid weight set;
* samples differ from each other (diversity >= 25 % of the zoo's) and sit among the zoo: median
  nearest-zoo distance < 10x the zoo's spacing between members (the failure this guards was ~60-80x).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.usefixtures("torch_one_thread"), pytest.mark.slow]
ROOT = os.path.join(os.path.dirname(__file__), "..")
TASK = "digits:3,5,7,8,9"


@pytest.fixture(scope="module")
def seen_zoo(tmp_path_factory):
    from rayweights.config import load_config
    from rayweights.zoo import ZooSpec, build_zoo

    uri = str(tmp_path_factory.mktemp("quality") / "zoo")
    spec = load_config(ZooSpec, os.path.join(ROOT, "jobs", "specs", "partial_bn.yaml"),
                       [f'tasks=["{TASK}"]', "held_out=[]", "max_tasks=0", "members_per_task=4", "keep_last=25",
                        "batch_size=16", "base_epochs=2", "arch_options={width: 16}", "resources.workers=1",
                        f"output={uri}"])
    build_zoo(spec, use_ray=False, progress=False)
    return uri


def test_pdiff_generates_zoo_quality_weights_on_a_seen_task(seen_zoo, tmp_path):
    from rayweights.config import load_config
    from rayweights.evaluation import make_adapter
    from rayweights.evaluation.diagnostics import diagnose, zoo_weights
    from rayweights.evaluation.memorisation import score_weight_sets
    from rayweights.sampling import load_sampler
    from rayweights.table import open_zoo
    from rayweights.train import GeneratorTrainConfig, train_local

    zoo = open_zoo(seen_zoo)
    z, groups = zoo_weights(zoo)
    assert z.shape == (100, zoo.layout.num_blocks * zoo.layout.block_size) and zoo.layout.num_params == 64
    cfg = load_config(GeneratorTrainConfig, os.path.join(ROOT, "jobs", "configs", "pdiff_tiny.yaml"),
                      [f"zoo={seen_zoo}", f"storage={tmp_path / 'runs'}"])
    export = str(tmp_path / "export")
    method = train_local(cfg, export=export)

    sampler = load_sampler(export, method="ddim", steps=100)
    L = sampler.layout
    x = sampler.sample(None, 100, seed=0)
    gen = (L.denormalize(x) if sampler.normalized else x).reshape(100, -1)

    ad = make_adapter("partial", TASK, zoo)
    zoo_acc, _ = score_weight_sets(ad, L, z)
    gen_acc, _ = score_weight_sets(ad, L, gen)
    table = (f"zoo best/avg/median {zoo_acc.max():.4f}/{zoo_acc.mean():.4f}/{np.median(zoo_acc):.4f}; "
             f"generated {gen_acc.max():.4f}/{gen_acc.mean():.4f}/{np.median(gen_acc):.4f}")
    assert gen_acc.max() >= zoo_acc.max() - 0.005, table
    assert gen_acc.mean() >= 0.95 * zoo_acc.mean(), table

    d = diagnose(gen, z, L, reconstructions=method.reconstruct(z.float()), zoo_groups=groups)
    report = d.table()
    assert d.sample_invalid_fraction == 0.0, report
    assert d.groups_within, report
    assert d.sample_diversity >= 0.25 * d.zoo_diversity, report
    assert d.nn_ratio < 10, report
    assert d.recon_error["median"] < d.spacing, report          # the autoencoder resolves the members
    assert torch.isfinite(gen).all()
