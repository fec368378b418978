"""Generator diagnostics: replays are found, junk is flagged, impossible weights are counted."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rayweights.blocks import WeightLayout
from rayweights.evaluation.diagnostics import (diagnose, diversity, flat_weights, group_stats, invalid_fraction,
                                               nn_distances)
from rayweights.table import CheckpointRecord, ZooWriter, open_zoo

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def bn_state_dict(member: int, ckpt: int) -> dict[str, torch.Tensor]:
    """A small conv+BN net: BN weight ~1, bias ~0, running stats, per-member offsets, small steps."""
    g = torch.Generator().manual_seed(7)
    base = {"0.weight": torch.randn(4, 2, 3, generator=g) * 0.3, "1.weight": 1 + 0.1 * torch.randn(4, generator=g),
            "1.bias": 0.05 * torch.randn(4, generator=g), "1.running_mean": 0.2 * torch.randn(4, generator=g),
            "1.running_var": 0.5 + torch.rand(4, generator=g)}
    h = torch.Generator().manual_seed(100 * member + ckpt)
    m = torch.Generator().manual_seed(1000 + member)
    out = {}
    for k, v in base.items():
        out[k] = v + 0.05 * torch.randn(v.shape, generator=m) + 0.005 * torch.randn(v.shape, generator=h)
    out["1.running_var"] = out["1.running_var"].abs()
    return out


@pytest.fixture(scope="module")
def zoo_uri(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("diag") / "zoo")
    layout = WeightLayout.from_state_dict(bn_state_dict(0, 0), rule=1, block_size=8)
    w = ZooWriter.create(uri, layout)
    for m in range(4):
        w.write_member(member_id=f"m{m}", task_id="t0", condition="digits:0,1,2", seed=m,
                       checkpoints=[CheckpointRecord(step=k, state_dict=bn_state_dict(m, k)) for k in range(5)])
    w.consolidate()
    return uri


def test_nn_distances_and_diversity():
    a = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 1.0]])
    assert nn_distances(a, a).tolist() == [0.0, 0.0, 0.0]
    assert nn_distances(a, a, exclude_self=True).tolist() == pytest.approx([1.0, math.sqrt(9 + 9), 1.0])
    assert nn_distances(a[:1], a[1:]).tolist() == pytest.approx([1.0])
    assert diversity(a) == pytest.approx((5.0 + 1.0 + math.sqrt(18)) / 3)
    assert diversity(a[:1]) == 0.0
    with pytest.raises(ValueError, match="exclude_self"):
        nn_distances(a, a[:2], exclude_self=True)


def test_group_stats_are_per_tensor_in_raw_space(zoo_uri):
    zoo = open_zoo(zoo_uri)
    flat = zoo.blocks().reshape(20, -1)
    st = group_stats(flat, zoo.layout)
    assert set(st) == set(zoo.layout.param_names)
    w = torch.stack([sd["1.weight"] for m in range(4) for _, sd in zoo.state_dicts(f"m{m}")])
    assert st["1.weight"][0] == pytest.approx(float(w.double().mean()), abs=1e-6)
    assert st["1.weight"][1] == pytest.approx(float(w.double().std(unbiased=False)), abs=1e-6)
    assert 0.8 < st["1.weight"][0] < 1.2                   # raw space, not normalised
    assert set(group_stats(flat, zoo.layout, by="group")) == {g.name for g in zoo.layout.groups}


def test_replaying_zoo_checkpoints_gives_nn_distance_zero(zoo_uri):
    zoo = open_zoo(zoo_uri)
    replay = zoo.blocks()[torch.tensor([0, 3, 7, 11, 19])]
    d = diagnose(replay, zoo)
    assert d.sample_to_zoo_nn["max"] == 0.0 and d.nn_ratio == 0.0
    assert d.zoo_member_nn["median"] > d.zoo_to_zoo_nn["median"] > 0       # members further apart than steps
    assert d.groups_within and d.sample_invalid_fraction == 0.0
    assert any("replays" in n for n in d.notes)
    assert "| NN distance" in d.table()
    assert json.loads(json.dumps(d.to_dict()))["num_zoo"] == 20


def test_gaussian_junk_is_flagged(zoo_uri):
    zoo = open_zoo(zoo_uri)
    junk = torch.randn(16, zoo.layout.num_blocks * zoo.layout.block_size, generator=torch.Generator().manual_seed(0))
    junk = junk * zoo.layout.valid_mask.reshape(1, -1)
    d = diagnose(junk, zoo)
    assert d.nn_ratio > 3
    assert not d.groups_within
    bad = {g.name for g in d.groups if not g.within}
    assert "1.weight" in bad                               # mean 0 where the zoo's BN weight is ~1
    assert d.sample_invalid_fraction > 0.5                 # negative running variances
    # zoo-like fresh samples (a member's mean plus small noise) pass
    z = zoo.blocks().reshape(20, -1).double()
    fresh = z[::5] + 0.002 * torch.randn(4, z.shape[1], dtype=torch.float64) * zoo.layout.valid_mask.reshape(1, -1)
    ok = diagnose(fresh, zoo)
    assert ok.nn_ratio < 1 and ok.groups_within and ok.sample_invalid_fraction == 0 and ok.sample_diversity > 0


def test_invalid_weights_are_counted(zoo_uri):
    zoo = open_zoo(zoo_uri)
    L = zoo.layout
    good = [sd for m in range(2) for _, sd in zoo.state_dicts(f"m{m}")]
    assert invalid_fraction(good, L) == 0.0
    bad_var = {**good[0], "1.running_var": -good[0]["1.running_var"]}
    bad_nan = {**good[1], "0.weight": good[1]["0.weight"].clone().index_fill_(0, torch.tensor([0]), float("nan"))}
    bad_big = {**good[2], "1.bias": good[2]["1.bias"] + 1e9}
    assert invalid_fraction([bad_var, bad_nan, bad_big, *good[3:7]], L) == pytest.approx(3 / 7)
    flat = flat_weights([bad_var, *good[:3]], L)
    assert invalid_fraction(flat, L) == pytest.approx(0.25)
    d = diagnose(flat, zoo)
    assert d.sample_invalid_fraction == pytest.approx(0.25) and d.zoo_invalid_fraction == 0.0


def test_reconstruction_error_is_compared_with_the_zoo_spacing(zoo_uri):
    zoo = open_zoo(zoo_uri)
    z = zoo.blocks().reshape(20, -1)
    d = diagnose(z[:4], zoo, reconstructions=z + 1e-4 * zoo.layout.valid_mask.reshape(1, -1))
    assert d.recon_error["median"] < d.spacing
    d2 = diagnose(z[:4], zoo, reconstructions=torch.zeros_like(z))
    assert any("reconstruction" in n for n in d2.notes)


def test_diagnose_generator_command(zoo_uri, tmp_path, capsys):
    from rayweights.cli import main
    from rayweights.sampling import GaussianWeightSampler

    GaussianWeightSampler.fit(zoo_uri, rank=3).save(str(tmp_path / "gauss"))
    out = tmp_path / "diag"
    assert main(["diagnose-generator", str(tmp_path / "gauss"), zoo_uri, "--num-samples", "6",
                 "--output", str(out)]) == 0
    d = json.loads((out / "diagnosis.json").read_text())
    assert d["num_samples"] == 6 and d["num_zoo"] == 20 and d["sample_invalid_fraction"] >= 0
    assert "NN distance" in capsys.readouterr().out and (out / "diagnosis.md").exists()
    assert main(["diagnose-generator", str(tmp_path / "nothing"), zoo_uri]) == 2
