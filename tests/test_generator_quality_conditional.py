"""Quality gate for the conditional generators (Denoised Weights, D2NWG): a small 4-class
digits-subsets zoo of an MLP-3 with BatchNorm is built here, each method is trained with its shipped
tiny recipe (in one process, the stage modules the Ray Train worker wraps), every held-out task is
sampled with DDIM (50 steps) and the samples must be usable:

* no invalid weight set (non-finite, negative BatchNorm running variance);
* samples differ from each other (median pairwise L2 within a condition >= 0.1 x the spread of one
  task's zoo members, and no two samples closer than 1e-3 x it) and by condition (distance between
  the conditions' sample means >= 0.1 x that between the zoo's task means);
* Denoised Weights: every tensor's mean/std inside the zoo's range (``rayweights.evaluation.diagnostics``,
  margin 0.1).

Targets these tiny recipes do not meet yet, kept as strict xfails (an XPASS fails the run, so the
marker goes as soon as a recipe meets them; bench/RESULTS.md, "Conditional generators on held-out
digits tasks", has the numbers): D2NWG's per-tensor stats in range, and for both methods an epoch-0
accuracy above random init on every held-out task and above the nearest zoo checkpoint + noise
(evaluate's baseline (e)) on at least 2 of 3.
"""

from __future__ import annotations

import pytest
import torch

from tests.condkit import build_subsets_zoo, make_method, score, table, train_config, train_in_process

pytestmark = [pytest.mark.slow, pytest.mark.long, pytest.mark.timeout(1200),    # ~8 min on 2 cores
              pytest.mark.usefixtures("torch_one_thread")]

SAMPLES = 6
NOT_MET = "not met by the tiny recipes yet (bench/RESULTS.md, conditional generators on held-out digits tasks)"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    zoo, spec = build_subsets_zoo(str(tmp_path_factory.mktemp("cond") / "zoo"), max_tasks=10, epochs=(4, 5))
    return zoo, spec


_SCORES: dict = {}


def _scored(name, built):
    """Train ``name`` once per module, sample every held-out task with DDIM-50, score the samples."""
    if name not in _SCORES:
        zoo, spec = built
        cfg = train_config(f"jobs/configs/{name}_tiny.yaml")
        method = make_method(name, zoo, cfg)
        train_in_process(method, cfg, zoo, seed=cfg.seed)
        samples = {c: method.layout.denormalize(method.sample([c], SAMPLES, mode="ddim", steps=50, seed=100 + i))
                   for i, c in enumerate(spec.held_out)}
        assert all(torch.isfinite(x).all() for x in samples.values())
        _SCORES[name] = score(samples, zoo, spec)
        print(table(name, _SCORES[name]))
    return _SCORES[name]


@pytest.mark.parametrize("name", ["denoised_weights", "d2nwg"])
def test_samples_are_valid_and_differ_by_sample_and_condition(name, built):
    s = _scored(name, built)
    assert s.invalid_fraction == 0.0, table(name, s)
    assert s.within_ratio >= 0.1 and s.min_pairwise >= 1e-3, table(name, s)
    assert s.between_ratio >= 0.1, table(name, s)


@pytest.mark.parametrize("name", ["denoised_weights",
                                  pytest.param("d2nwg", marks=pytest.mark.xfail(reason=NOT_MET, strict=True))])
def test_every_tensor_mean_and_std_inside_the_zoo_range(name, built):
    s = _scored(name, built)
    assert s.groups_within_fraction == 1.0, s.groups_outside


@pytest.mark.xfail(reason=NOT_MET, strict=True)
@pytest.mark.parametrize("name", ["denoised_weights", "d2nwg"])
def test_epoch0_accuracy_above_random_and_nearest_checkpoint_plus_noise(name, built):
    s = _scored(name, built)
    assert all(t.beats_random for t in s.tasks), table(name, s)
    assert sum(t.beats_nearest_noise for t in s.tasks) >= 2, table(name, s)
