"""Quality gate for the conditional generators (Denoised Weights, D2NWG): a small 4-class
digits-subsets zoo of an MLP-3 with BatchNorm is built here, each method is trained with its shipped
tiny recipe (in one process, the stage modules the Ray Train worker wraps), every held-out task is
sampled with the sampling default of ``sample-weights`` and the samples must be usable:

* every tensor's mean/std inside the zoo's range (``rayweights.evaluation.diagnostics``, margin 0.1);
* no invalid weight set (non-finite, negative BatchNorm running variance);
* samples differ from each other (median pairwise L2 within a condition >= 0.1 x the spread of one
  task's zoo members, and no two samples closer than 1e-3 x it) and by condition (distance between
  the conditions' sample means >= 0.1 x that between the zoo's task means);
* epoch-0 accuracy (no fine-tuning) above random init on every held-out task and above the nearest
  zoo checkpoint + noise (evaluate's baseline (e)) on at least 2 of 3.

The numbers of one run are in bench/RESULTS.md (bench/bench_conditional_quality.py prints the same
table).
"""

from __future__ import annotations

import pytest
import torch

from tests.condkit import build_subsets_zoo, make_method, score, table, train_config, train_in_process

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("torch_one_thread"),
              # the targets are not met yet (bench/RESULTS.md, "Conditional generators on held-out digits
              # tasks"): the gate records them at their stated thresholds; strict=False keeps CI green until
              # a generator meets them, and a pass is reported as XPASS
              pytest.mark.xfail(reason="held-out epoch-0 accuracy / diversity targets not met by the tiny recipes",
                                strict=False)]

SAMPLES = 6


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    zoo, spec = build_subsets_zoo(str(tmp_path_factory.mktemp("cond") / "zoo"), max_tasks=10, epochs=(4, 5))
    return zoo, spec


def _check(name, built):
    from rayweights.sampling import SampleConfig

    zoo, spec = built
    cfg = train_config(f"jobs/configs/{name}_tiny.yaml")
    method = make_method(name, zoo, cfg)
    train_in_process(method, cfg, zoo, seed=cfg.seed)
    d = SampleConfig()                                    # sample-weights' defaults
    samples = {c: method.layout.denormalize(method.sample([c], SAMPLES, mode=d.method, t=d.t, steps=d.steps,
                                                          seed=100 + i))
               for i, c in enumerate(spec.held_out)}
    s = score(samples, zoo, spec)
    print(table(name, s))
    assert s.invalid_fraction == 0.0, table(name, s)
    assert s.groups_within_fraction == 1.0, s.groups_outside
    assert s.within_ratio >= 0.1 and s.min_pairwise >= 1e-3, table(name, s)
    assert s.between_ratio >= 0.1, table(name, s)
    for t in s.tasks:
        assert t.beats_random, table(name, s)
    assert sum(t.beats_nearest_noise for t in s.tasks) >= 2, table(name, s)
    assert all(torch.isfinite(x).all() for x in samples.values())


def test_denoised_weights_samples_are_usable_on_held_out_tasks(built):
    _check("denoised_weights", built)


def test_d2nwg_samples_are_usable_on_held_out_tasks(built):
    _check("d2nwg", built)
