import json

import pytest
import torch
from hypothesis import given, settings, strategies as st

from rayweights.blocks import GROUPING_RULES, LayoutError, WeightLayout, register_rule

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@st.composite
def state_dicts(draw):
    """Random LoRA-ish / BN-ish state_dicts of random shapes and dtypes."""
    n_layers = draw(st.integers(1, 4))
    sd = {}
    for i in range(n_layers):
        kind = draw(st.sampled_from(["lora", "linear", "conv"]))
        dt = draw(st.sampled_from(DTYPES))
        c_out = draw(st.integers(1, 9))
        c_in = draw(st.integers(1, 7))
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        rnd = lambda *s: (torch.randn(*s, generator=g) * 3).to(dt)
        if kind == "lora":
            r = draw(st.integers(1, 3))
            sd[f"layers.{i}.conv.lora_down.weight"] = rnd(r, c_in, 3, 3)
            sd[f"layers.{i}.conv.lora_up.weight"] = rnd(c_out, r, 1, 1)
        elif kind == "linear":
            sd[f"layers.{i}.fc.weight"] = rnd(c_out, c_in)
            if draw(st.booleans()):
                sd[f"layers.{i}.fc.bias"] = rnd(c_out)
        else:
            sd[f"layers.{i}.conv.weight"] = rnd(c_out, c_in, 3, 3)
        if draw(st.booleans()):
            sd[f"layers.{i}.bn.weight"] = rnd(c_out)
            sd[f"layers.{i}.bn.bias"] = rnd(c_out)
            sd[f"layers.{i}.bn.running_mean"] = rnd(c_out)
            sd[f"layers.{i}.bn.num_batches_tracked"] = torch.tensor(3)
    return sd


@settings(max_examples=60, deadline=None)
@given(sd=state_dicts(), rule=st.sampled_from([1, 2, 3]), block_size=st.sampled_from([1, 3, 16, 64, 256]))
def test_round_trip_is_bit_exact(sd, rule, block_size):
    layout = WeightLayout.from_state_dict(sd, rule=rule, block_size=block_size)
    blocks = layout.tokenize(sd)
    assert blocks.dtype == torch.float32 and tuple(blocks.shape) == (layout.num_blocks, block_size)
    sd2 = layout.detokenize(blocks)
    for name in layout.param_names:
        assert sd2[name].dtype == sd[name].dtype and sd2[name].shape == sd[name].shape
        assert torch.equal(sd2[name].view(torch.int16 if sd[name].element_size() == 2 else torch.int32),
                           sd[name].view(torch.int16 if sd[name].element_size() == 2 else torch.int32)), name
    # padding is zero, every group starts on a block boundary
    assert torch.all(blocks[~layout.valid_mask] == 0)
    assert WeightLayout.from_json(layout.to_json()) == layout
    # non-float tensors are never in a layout
    assert all("num_batches_tracked" not in n for n in layout.param_names)


@settings(max_examples=30, deadline=None)
@given(sd=state_dicts(), block_size=st.sampled_from([4, 32]))
def test_normalisation_round_trip(sd, block_size):
    layout = WeightLayout.from_state_dict(sd, rule=1, block_size=block_size)
    batch = torch.stack([layout.tokenize(sd), layout.tokenize(sd) * 2 + layout.valid_mask.float()])
    L = layout.fit_stats(batch)
    assert L.has_stats and L.same_structure(layout)
    z = L.normalize(batch)
    assert torch.all(z[:, ~L.valid_mask] == 0)
    back = L.denormalize(z)
    torch.testing.assert_close(back, batch, rtol=1e-4, atol=1e-4)
    # rows form: [n, bs] with block_index
    idx = torch.arange(L.num_blocks)
    torch.testing.assert_close(L.normalize(batch[0], block_index=idx), z[0])
    assert WeightLayout.from_json(L.to_json()) == L


def test_element_normalisation_subtracts_the_zoo_mean_at_every_position():
    """by="element": zeros decode to the per-position mean of the fitted sets, a tensor's residual std
    scales it, the stats survive JSON, and a position_mean of the wrong size is refused."""
    sd = _lora_sd()
    layout = WeightLayout.from_state_dict(sd, rule=1, block_size=16)
    g = torch.Generator().manual_seed(0)
    base = layout.tokenize(sd)
    batch = torch.stack([base + 0.1 * torch.randn(base.shape, generator=g) for _ in range(5)]) * layout.valid_mask
    L = layout.fit_stats(batch, by="element")
    assert L.stats_by == "element" and L.same_structure(layout)
    mean = batch.mean(0)
    torch.testing.assert_close(L.denormalize(torch.zeros(1, L.num_blocks, L.block_size))[0], mean, rtol=1e-6, atol=1e-5)
    z = L.normalize(batch)
    assert torch.all(z[:, ~L.valid_mask] == 0)
    torch.testing.assert_close(L.denormalize(z), batch, rtol=1e-4, atol=1e-4)
    # unit variance of the residuals per tensor: the common pattern (base) is gone, not rescaled
    assert abs(float(z[:, L.valid_mask].pow(2).mean()) - 1.0) < 0.05
    tensor_stats = layout.fit_stats(batch, by="tensor")
    assert float(tensor_stats.normalize(batch).mean(0)[L.valid_mask].pow(2).mean()) > 0.5   # tensor stats keep it
    back = WeightLayout.from_json(L.to_json())
    assert back == L and back.stats_by == "element"
    torch.testing.assert_close(back.normalize(batch), z)
    d = json.loads(L.to_json())
    d["position_mean"]["shape"] = [L.num_blocks + 1, L.block_size]
    with pytest.raises(LayoutError, match="position_mean"):
        WeightLayout.from_dict(d)


def _lora_sd():
    return {
        "enc.0.conv.lora_down.weight": torch.arange(2 * 3 * 3 * 3, dtype=torch.float32).view(2, 3, 3, 3),
        "enc.0.conv.lora_up.weight": torch.arange(4 * 2, dtype=torch.float32).view(4, 2, 1, 1) + 100,
        "enc.0.bn.weight": torch.full((4,), 7.0),
        "enc.0.bn.bias": torch.full((4,), 8.0),
        "enc.1.fc.weight": torch.ones(5, 4),
        "enc.1.fc.bias": torch.zeros(5),
    }


def test_rule_1_groups_layer_lora_then_bn():
    L = WeightLayout.from_state_dict(_lora_sd(), rule=1, block_size=16)
    assert [g.params for g in L.groups] == [
        ("enc.0.conv.lora_down.weight", "enc.0.conv.lora_up.weight", "enc.0.bn.weight", "enc.0.bn.bias"),
        ("enc.1.fc.weight", "enc.1.fc.bias")]
    g0 = L.groups[0]
    assert g0.numel == 54 + 8 + 4 + 4 and g0.num_blocks == 5 and L.groups[1].first_block == 5
    flat = L.tokenize_flat(_lora_sd())
    assert torch.equal(flat[:54], torch.arange(54, dtype=torch.float32))      # appended in order
    assert torch.equal(flat[54:62], torch.arange(8, dtype=torch.float32) + 100)


def test_rule_2_interleaves_channels_and_rule_3_splits():
    sd = _lora_sd()
    L2 = WeightLayout.from_state_dict(sd, rule=2, block_size=16)
    flat = L2.tokenize_flat(sd)
    # channel 0 of every tensor first: down[0] (27 values), up[0] (2), bn.weight[0], bn.bias[0]
    assert torch.equal(flat[:27], torch.arange(27, dtype=torch.float32))
    assert torch.equal(flat[27:29], torch.tensor([100.0, 101.0]))
    assert flat[29].item() == 7.0 and flat[30].item() == 8.0
    assert torch.equal(L2.detokenize(L2.tokenize(sd))["enc.0.conv.lora_up.weight"], sd["enc.0.conv.lora_up.weight"])
    L3 = WeightLayout.from_state_dict(sd, rule=3, block_size=16)
    assert len(L3.groups) == len(sd)


def test_select_keywords():
    sd = _lora_sd()
    assert WeightLayout.from_state_dict(sd, select="lora").param_names == [
        "enc.0.conv.lora_down.weight", "enc.0.conv.lora_up.weight"]
    assert WeightLayout.from_state_dict(sd, select="norm").param_names == ["enc.0.bn.weight", "enc.0.bn.bias"]
    assert WeightLayout.from_state_dict(sd, select="last:1").param_names == ["enc.1.fc.weight", "enc.1.fc.bias"]
    assert WeightLayout.from_state_dict(sd, select=[r"fc\.bias$"]).param_names == ["enc.1.fc.bias"]
    L = WeightLayout.from_state_dict(sd, select="lora")
    # tokenizing the full state_dict is fine: unselected tensors are known exclusions
    L.tokenize(sd)
    with pytest.raises(LayoutError, match="select"):
        WeightLayout.from_state_dict(sd, select="nothing-like-this")
    with pytest.raises(LayoutError, match="matched no"):
        WeightLayout.from_state_dict(sd, select=["^zzz"])


def test_mismatch_errors_name_the_parameter():
    sd = _lora_sd()
    L = WeightLayout.from_state_dict(sd, rule=1, block_size=16)
    bad = dict(sd)
    del bad["enc.1.fc.bias"]
    with pytest.raises(LayoutError, match=r"enc\.1\.fc\.bias: missing"):
        L.tokenize(bad)
    bad = dict(sd, **{"enc.9.extra.weight": torch.ones(2)})
    with pytest.raises(LayoutError, match=r"enc\.9\.extra\.weight: extra"):
        L.tokenize(bad)
    bad = dict(sd, **{"enc.1.fc.weight": torch.ones(5, 3)})
    with pytest.raises(LayoutError, match=r"enc\.1\.fc\.weight: shape"):
        L.tokenize(bad)
    with pytest.raises(LayoutError, match="block_size"):
        L.detokenize(torch.zeros(L.num_blocks, 8))
    with pytest.raises(LayoutError, match="float64"):
        WeightLayout.from_state_dict({"w": torch.ones(2, dtype=torch.float64)})
    with pytest.raises(LayoutError, match="block_size"):
        WeightLayout.from_state_dict(sd, block_size=0)
    with pytest.raises(LayoutError, match="rule"):
        WeightLayout.from_state_dict(sd, rule=42)


def test_foreign_layout_version_is_rejected():
    d = json.loads(WeightLayout.from_state_dict(_lora_sd()).to_json())
    d["format_version"] = "someone-else/9"
    with pytest.raises(LayoutError, match="format_version"):
        WeightLayout.from_json(json.dumps(d))
    with pytest.raises(LayoutError, match="JSON"):
        WeightLayout.from_json("{not json")


def test_registry_accepts_new_rules():
    @register_rule("one-group")
    def one_group(entries):
        return [("all", [n for n, _ in entries], False)]

    try:
        L = WeightLayout.from_state_dict(_lora_sd(), rule="one-group", block_size=8)
        assert len(L.groups) == 1
        assert torch.equal(L.detokenize(L.tokenize(_lora_sd()))["enc.1.fc.weight"], torch.ones(5, 4))
    finally:
        GROUPING_RULES.pop("one-group")


def test_per_tensor_stats_model_variances_as_logs_so_every_decoded_variance_is_positive():
    torch.manual_seed(0)
    base = {"0.weight": torch.randn(4, 8), "1.weight": torch.ones(4), "1.bias": torch.zeros(4),
            "1.running_mean": torch.zeros(4), "1.running_var": torch.ones(4)}
    sds = [{k: v + 0.1 * torch.randn_like(v) if k != "1.running_var" else torch.rand(4) * 0.2 + 0.01
            for k, v in base.items()} for _ in range(8)]
    layout = WeightLayout.from_state_dict(sds[0], rule=1, block_size=16)
    blocks = torch.stack([layout.tokenize(sd) for sd in sds])
    fitted = layout.fit_stats(blocks, by="tensor")
    assert {p.name for p in fitted.params if p.transform == "log"} == {"1.running_var"}
    assert torch.allclose(fitted.denormalize(fitted.normalize(blocks)), blocks, atol=1e-5)
    z = fitted.normalize(blocks)
    assert abs(float(z[fitted.valid_mask.expand_as(z)].std()) - 1) < 0.05    # log-space stats standardise it
    noisy = fitted.denormalize(torch.randn_like(z) * 3)                     # a poor denoiser's output
    assert all((fitted.detokenize(x)["1.running_var"] > 0).all() for x in noisy)
    by_group = layout.fit_stats(blocks, by="group")           # the linear model crosses zero there
    assert any((by_group.detokenize(x)["1.running_var"] < 0).any() for x in by_group.denormalize(torch.randn_like(z) * 3))
    again = WeightLayout.from_json(fitted.to_json())
    assert again == fitted and again.same_structure(layout)
    bad = json.loads(fitted.to_json())
    bad["params"][-1]["transform"] = "sqrt"
    with pytest.raises(LayoutError, match="running_var: unknown transform 'sqrt'"):
        WeightLayout.from_dict(bad)
