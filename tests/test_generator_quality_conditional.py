"""Quality gate for the conditional generators (Denoised Weights, D2NWG) on zoos built here.

Default tier, **heads on a shared body** (``jobs/specs/digits_heads.yaml``: every 4-class digits task but 3 held out, two
members each, training only the classifier head of one shared frozen MLP): D2NWG's shipped tiny recipe,
DDIM-50 samples for the held-out tasks must be accurate (above random init on every task, >= 0.7
epoch-0 accuracy on average; the zoo's members score ~0.92 on their own tasks, random ~0.26), valid,
inside the zoo's per-tensor statistics and diverse. The same test on the recipe before v-prediction
and the longer stages scored 0.30-0.44 (bench/RESULTS.md, "Heads on a shared body").

**Whole networks** (a 10-task zoo of an MLP-3 with BatchNorm, every member from its own
initialisation), both methods' tiny recipes, DDIM-50 (Denoised Weights in the default tier, ~30 s;
D2NWG, whose heads test above covers it, in the long tier):

* no invalid weight set (non-finite, negative BatchNorm running variance);
* samples differ from each other (median pairwise L2 within a condition >= 0.1 x the spread of one
  task's zoo members, and no two samples closer than 1e-3 x it) and by condition (distance between
  the conditions' sample means >= 0.1 x that between the zoo's task means);
* every tensor's mean/std inside the zoo's range (``rayweights.evaluation.diagnostics``, margin 0.1).

Not met, kept as strict xfails (an XPASS fails the run): on whole networks from independent
initialisations, epoch-0 accuracy above random init on every held-out task and above the nearest
zoo checkpoint + noise (evaluate's baseline (e)) on 2 of 3. Denoised Weights has no heads-zoo test:
its tiny BlockUNet1D does not fit that zoo even with an oracle condition (bench/RESULTS.md).
"""

from __future__ import annotations

import pytest
import torch

from tests.condkit import HEADS_SPEC, build_spec_zoo, build_subsets_zoo, make_method, score, table, train_config, train_in_process

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200), pytest.mark.usefixtures("torch_one_thread")]
long = pytest.mark.long          # D2NWG on whole networks (~75 s) and the unmet targets: the long tier

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


@pytest.mark.parametrize("name", ["denoised_weights", pytest.param("d2nwg", marks=long)])
def test_samples_are_valid_and_differ_by_sample_and_condition(name, built):
    s = _scored(name, built)
    assert s.invalid_fraction == 0.0, table(name, s)
    assert s.within_ratio >= 0.1 and s.min_pairwise >= 1e-3, table(name, s)
    assert s.between_ratio >= 0.1, table(name, s)


@pytest.mark.parametrize("name", ["denoised_weights", pytest.param("d2nwg", marks=long)])
def test_every_tensor_mean_and_std_inside_the_zoo_range(name, built):
    s = _scored(name, built)
    assert s.groups_within_fraction == 1.0, s.groups_outside


@long
@pytest.mark.xfail(reason=NOT_MET, strict=True)
@pytest.mark.parametrize("name", ["denoised_weights", "d2nwg"])
def test_epoch0_accuracy_above_random_and_nearest_checkpoint_plus_noise(name, built):
    s = _scored(name, built)
    assert all(t.beats_random for t in s.tasks), table(name, s)
    assert sum(t.beats_nearest_noise for t in s.tasks) >= 2, table(name, s)


# ----------------------------------------------------------------------------- heads on a shared body
@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    """Every C(10, 4) digits task but the held-out ones (207 tasks x 2 members): the members train only
    the classifier head on one shared, frozen body (``init: shared``, ``select: last:1``), the setting of
    D2NWG's classifier heads and of LoRA zoos: what a task changes in the weights is learnable."""
    return build_spec_zoo(HEADS_SPEC, str(tmp_path_factory.mktemp("heads") / "zoo"))


def test_d2nwg_heads_for_held_out_tasks_are_accurate(heads):
    """D2NWG's shipped tiny recipe on the heads zoo, DDIM-50 samples for the 3 held-out tasks: above
    random init on every task and at least 0.7 epoch-0 accuracy on average (the zoo's members score
    ~0.92 on their own tasks, random init ~0.26); valid, diverse within and between conditions."""
    zoo, spec = heads
    cfg = train_config("jobs/configs/d2nwg_tiny.yaml")
    method = make_method("d2nwg", zoo, cfg)
    train_in_process(method, cfg, zoo, seed=cfg.seed)
    samples = {c: method.layout.denormalize(method.sample([c], SAMPLES, mode="ddim", steps=50, seed=100 + i))
               for i, c in enumerate(spec.held_out)}
    s = score(samples, zoo, spec)
    print(table("d2nwg, heads zoo, ddim:50", s))
    assert s.invalid_fraction == 0.0 and s.groups_within_fraction == 1.0, table("d2nwg", s)
    assert all(t.beats_random for t in s.tasks), table("d2nwg", s)
    mean = sum(sum(t.generated) / len(t.generated) for t in s.tasks) / len(s.tasks)
    assert mean >= 0.7, table("d2nwg", s)
    assert s.within_ratio >= 0.1 and s.min_pairwise >= 1e-3 and s.between_ratio >= 0.1, table("d2nwg", s)
