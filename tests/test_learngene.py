"""rayweights.learngene: decomposition, persistence, other-size initialisation, Σ-only phase, job."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from rayweights.config import ConfigError, from_dict
from rayweights.learngene import (LayerType, Learngene, LearngeneError, build_model, collect_learngene, decompose,
                                  extract, get_model_family, init_from_learngene, map_depth, match_layer_types,
                                  materialize, sigma_phase_parameters)
from rayweights.learngene.build import resize_rows, resize_segments
from rayweights.learngene.tasks import make_task, train_steps

torch.set_num_threads(1)

# Stated tolerance of a full-rank decomposition (float32 factors, unit-scale weights):
# relative Frobenius error < 1e-5 and max absolute error < 1e-5.
TOL = 1e-5


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# --------------------------------------------------------------------------- decomposition
@pytest.mark.parametrize("shape", [(4, 12, 20), (3, 8, 6, 3), (5, 16, 16)])
def test_full_rank_full_mode_reconstructs_every_layer(shape):
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    U, V, S, rel, kept = decompose(W, "full")
    assert rel < 1e-10 and abs(kept - 1) < 1e-10          # the float64 fit
    for i in range(W.shape[0]):                            # the stored float32 factors
        Wi = (U @ S[i] @ V.T).reshape(W.shape[1:])
        assert _rel(Wi, W[i]) < TOL and (Wi - W[i]).abs().max() < TOL


def test_diag_mode_exact_for_one_layer_and_for_shared_bases():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(1, 10, 7, generator=g)
    U, V, S, rel, _ = decompose(W, "diag")                 # a single layer: its SVD
    assert _rel((U * S[0]) @ V.T, W[0]) < TOL
    Uo = torch.linalg.qr(torch.randn(12, 5, generator=g))[0]
    Vo = torch.linalg.qr(torch.randn(9, 5, generator=g))[0]
    Ws = torch.stack([Uo @ torch.diag(torch.randn(5, generator=g)) @ Vo.T for _ in range(4)])
    U, V, S, rel, _ = decompose(Ws, "diag", rank=5)       # CP rank 5 tensor: ALS recovers it
    assert rel < 1e-4
    for i in range(4):
        assert _rel((U * S[i]) @ V.T, Ws[i]) < 1e-4


def test_rank_and_energy_truncate_with_consistent_error():
    W = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(2))
    U, V, S, rel, kept = decompose(W, "full", rank=4)
    assert U.shape == (16, 4) and V.shape == (16, 4) and S.shape == (3, 4, 4)
    R = torch.einsum("mr,lrs,ns->lmn", U, S, V)
    assert abs(_rel(R, W) - rel) < 1e-4 and abs(rel ** 2 - (1 - kept)) < 1e-4
    _, _, _, rel_e, kept_e = decompose(W, "full", energy=0.6)
    assert kept_e >= 0.3 and rel_e < 1.0
    with pytest.raises(LearngeneError, match="energy"):
        decompose(W, "full", energy=1.5)
    with pytest.raises(LearngeneError, match="mode"):
        decompose(W, "svd")


# --------------------------------------------------------------------------- layer types
class Net(nn.Module):
    def __init__(self, width=8, depth=3, inp=5):
        super().__init__()
        self.inp = nn.Linear(inp, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width)) for _ in range(depth))
        self.convs = nn.ModuleList(nn.Conv1d(width, width, 3, padding=1) for _ in range(depth))
        self.head = nn.Linear(width, 2)

    def forward(self, x):
        h = self.inp(x)
        for b, c in zip(self.blocks, self.convs):
            h = h + torch.relu(b(h))
            h = h + c(h[:, :, None].expand(-1, -1, 4)).mean(-1)
        return self.head(h)


NET_TYPES = [LayerType("inp", r"inp\.weight"), LayerType("lin", r"blocks\.(\d+)\.0\.weight"),
             LayerType("conv", r"convs\.(\d+)\.weight"), LayerType("head", r"head\.weight")]


def test_layer_type_matching_orders_blocks_and_reports_errors():
    net = Net(depth=12)
    m = match_layer_types(net.state_dict(), NET_TYPES, require_all=True)
    assert m["lin"].params[:3] == ["blocks.0.0.weight", "blocks.1.0.weight", "blocks.2.0.weight"]
    assert m["lin"].params[10] == "blocks.10.0.weight" and m["conv"].shape == (8, 8, 3)
    with pytest.raises(LearngeneError, match="matches layer types"):
        match_layer_types(net.state_dict(), NET_TYPES + [LayerType("dup", r"head\.weight")])
    sd = dict(net.state_dict(), **{"blocks.3.0.weight": torch.zeros(4, 8)})
    with pytest.raises(LearngeneError, match="mixes shapes"):
        match_layer_types(sd, NET_TYPES)
    with pytest.raises(LearngeneError, match="matches no parameter"):
        match_layer_types(net.state_dict(), [LayerType("nope", r"nothing\.(\d+)")], require_all=True)
    with pytest.raises(LearngeneError, match="only matrices"):
        match_layer_types(net.state_dict(), [LayerType("bias", r"head\.bias")])
    with pytest.raises(ConfigError, match="pattern"):
        from_dict(LayerType, {"name": "x", "pattern": "blocks.(\\d+"})
    with pytest.raises(LearngeneError, match="chunks"):
        match_layer_types(net.state_dict(), [LayerType("head", r"head\.weight", in_chunks=3)])


def test_map_depth_modes():
    S = torch.tensor([[0.0], [1.0], [4.0]])
    assert torch.equal(map_depth(S, 3), S)
    up = map_depth(S, 5, "interpolate")
    assert up[0] == 0 and up[-1] == 4 and torch.allclose(up[:, 0], torch.tensor([0, 0.5, 1, 2.5, 4]))
    assert torch.allclose(map_depth(S, 1, "interpolate"), torch.tensor([[1.0]]))
    assert torch.equal(map_depth(S, 2, "nearest"), S[[0, 2]])
    assert torch.equal(map_depth(S, 5, "copy")[:, 0], torch.tensor([0, 1, 4, 4, 4.0]))
    assert torch.equal(map_depth(S, 5, "extrapolate")[:, 0], torch.tensor([0, 1, 4, 7, 10.0]))
    with pytest.raises(LearngeneError, match="depth"):
        map_depth(S, 2, "spline")


def test_width_resizing_truncates_and_extends_orthogonally():
    g = torch.Generator().manual_seed(0)
    F = torch.randn(6, 4)
    assert torch.equal(resize_rows(F, 3, "orthogonal", g), F[:3])
    E = resize_rows(F, 12, "orthogonal", g)
    assert torch.equal(E[:6], F)
    # 6 new rows = an orthogonal mixing of the 6 old ones: same Gram matrix (norms, angles)
    assert torch.allclose(E[6:].T @ E[6:], F.T @ F, atol=1e-4)
    assert torch.equal(resize_rows(F, 8, "zero", g)[6:], torch.zeros(2, 4))
    # segments are resized separately: [a(4) | b(2)] -> [a(2) | b(3)]
    seg = resize_segments(F, [4, 2], [2, 3], "zero", g)
    assert torch.equal(seg[:2], F[:2]) and torch.equal(seg[2:4], F[4:6]) and torch.equal(seg[4], torch.zeros(4))
    with pytest.raises(LearngeneError, match="segments"):
        resize_segments(F, [4, 2], [6], "zero", g)


# --------------------------------------------------------------------------- persistence
def test_save_load_roundtrip_and_bad_files(tmp_path):
    net = Net()
    lg = extract(net, NET_TYPES, mode="diag", source={"note": "unit"})
    uri = lg.save(str(tmp_path / "lg"))
    back = Learngene.load(uri)
    assert back.mode == "diag" and back.source == {"note": "unit"} and list(back.genes) == list(lg.genes)
    for name, g in lg.genes.items():
        for k in ("U", "V", "sigma"):
            assert torch.equal(getattr(g, k), getattr(back.genes[name], k))
    desc = json.loads((tmp_path / "lg" / "learngene.json").read_text())
    assert {g["name"] for g in desc["genes"]} == {"inp", "lin", "conv", "head"}
    with pytest.raises(LearngeneError, match="not found"):
        Learngene.load(str(tmp_path / "nothing"))
    (tmp_path / "lg" / "learngene.safetensors").write_bytes(b"garbage")
    with pytest.raises(LearngeneError, match="learngene.safetensors"):
        Learngene.load(uri)
    (tmp_path / "lg" / "learngene.json").write_text("{not json")
    with pytest.raises(LearngeneError, match="learngene.json"):
        Learngene.load(uri)


@pytest.mark.s3
def test_save_load_on_s3(s3_uri):
    lg = extract(Net(), NET_TYPES, mode="full")
    lg.save(s3_uri + "/lg")
    back = Learngene.load(s3_uri + "/lg")
    assert torch.equal(back.genes["conv"].sigma, lg.genes["conv"].sigma)


# --------------------------------------------------------------------------- other sizes
def test_same_size_full_rank_init_reproduces_the_source():
    src = Net()
    lg = extract(src, NET_TYPES, mode="full")
    torch.manual_seed(5)
    tgt, rep = build_model(lambda: Net(), lg)
    assert rep.num_initialised == 8 and "blocks.0.1.weight" in rep.default
    for name in (p for ps in rep.initialised.values() for p in ps):
        a, b = tgt.state_dict()[name], src.state_dict()[name]
        assert _rel(a, b) < TOL and (a - b).abs().max() < TOL


@pytest.mark.parametrize("mode", ["diag", "full"])
def test_other_sizes_load_and_train(mode):
    fam = get_model_family("digits_transformer")
    task = make_task("digits", batch_size=32)
    torch.manual_seed(0)
    src = fam.construct({"width": 16, "depth": 2, "heads": 2})
    train_steps(src, task, 15, lr=3e-3, eval_every=100, eval_at_start=False)
    lg = extract(src, fam.types_for(src), mode=mode)
    for size in ({"width": 8, "depth": 1, "heads": 2}, {"width": 24, "depth": 4, "heads": 2}):
        model, rep = build_model(lambda: fam.construct(size), lg)
        assert rep.num_initialised == sum(1 for n in dict(model.named_parameters())
                                          if (n.endswith("weight") and "norm" not in n) or n == "pos")
        assert not rep.unmatched_genes
        # the learngene changed the default init of every covered tensor, and shapes are right
        fresh = fam.construct(size)
        for n, p in model.named_parameters():
            assert p.shape == fresh.state_dict()[n].shape
        assert torch.isfinite(model(task.val_x[:4])).all()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        curve = train_steps(model, task, 10, lr=3e-3, eval_every=10)
        assert all(torch.isfinite(torch.tensor(p.metrics["loss"])) for p in curve)
        assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
        model.load_state_dict(fresh.state_dict())        # an ordinary state_dict of that size


def test_sigma_only_phase_updates_nothing_else():
    fam = get_model_family("digits_transformer")
    task = make_task("digits", batch_size=32)
    torch.manual_seed(0)
    lg = extract(fam.construct({"width": 16, "depth": 2, "heads": 2}), fam.layer_types, mode="diag")
    for train_norms in (False, True):
        model, rep = build_model(lambda: fam.construct({"width": 24, "depth": 3, "heads": 2}), lg, factorized=True)
        trainable = set(sigma_phase_parameters(model, train_norms=train_norms))
        sigmas = {n for n in trainable if n.endswith(".original")}
        assert len(sigmas) == rep.num_initialised
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        bufs = {n: b.detach().clone() for n, b in model.named_buffers()}
        train_steps(model, task, 3, lr=1e-2, subset=0.1, eval_at_start=False, eval_every=100)
        for n, p in model.named_parameters():
            changed = not torch.equal(before[n], p)
            if n in sigmas:
                assert changed, n
            elif train_norms and n in trainable:
                assert "norm" in n
            else:
                assert not changed, f"{n} changed during the Σ-only phase"
        for n, b in model.named_buffers():     # U and V (and everything else) untouched
            assert torch.equal(bufs[n], b), n
        weights = {n: w.detach().clone() for n, w in model.state_dict().items() if "parametrizations" not in n}
        materialize(model)
        sd = model.state_dict()
        assert all(p.requires_grad for p in model.parameters())
        assert set(sd) == set(fam.construct({"width": 24, "depth": 3, "heads": 2}).state_dict())
        for n, w in weights.items():
            assert torch.equal(sd[n], w)


def test_learngene_learning_shares_and_returns_the_factors():
    fam = get_model_family("digits_transformer")
    task = make_task("digits", batch_size=32)
    torch.manual_seed(0)
    model = fam.construct({"width": 16, "depth": 3, "heads": 2})
    lg = extract(model, fam.layer_types, mode="diag", rank=6)
    rep = init_from_learngene(model, lg, factorized=True, train_factors=True)
    q_us = {id(model.blocks[i].attn.q.parametrizations.weight[0].U) for i in range(3)}
    assert len(q_us) == 1                                           # one shared U per layer type
    U0 = lg.genes["q"].U.clone()
    train_steps(model, task, 5, lr=1e-2, eval_at_start=False, eval_every=100)
    learned = collect_learngene(model, rep, lg)
    assert not torch.equal(learned.genes["q"].U, U0)
    for i in range(3):                                              # the learngene *is* the model
        w = model.blocks[i].attn.q.weight.detach()
        assert _rel(learned.genes["q"].weight(i), w) < TOL


def test_block_unet_generator_sizes():
    fam = get_model_family("block_unet1d")
    base = {"preset": "tiny", "block_size": 32}
    src = fam.construct({**base, "block_channels": [16, 32], "layers_per_block": 2})
    types = fam.types_for(src)
    names = {t.name for t in types}
    assert {"d1_tf_q1", "u0_conv1_first", "u1_conv1_mid", "d0_conv2", "time_embedding_linear_1"} <= names
    lg = extract(src, types, mode="full", rank=16)
    x, t, idx = torch.randn(3, 1, 32), torch.tensor([1, 500, 999]), torch.tensor([0, 3, 7])
    for size in ({"block_channels": [8, 16], "layers_per_block": 1}, {"block_channels": [24, 48], "layers_per_block": 3}):
        model, rep = build_model(lambda: fam.construct({**base, **size}), lg, layer_types=fam.types_for(
            fam.construct({**base, **size})))
        assert rep.num_initialised > 20
        assert torch.isfinite(model(x, t, idx)).all()
        from rayweights.generators import BlockUNet1D

        assert isinstance(fam.unwrap(model), BlockUNet1D)


# --------------------------------------------------------------------------- the job
def _write(tmp_path, text, name="cfg.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


BASE = """name: t
family: digits_transformer
source: {size: {width: 8, depth: 1, heads: 2}, steps: 6}
targets:
  - {name: small, size: {width: 8, depth: 2, heads: 2}}
  - {name: large, size: {width: 16, depth: 2, heads: 2}}
sigma_phase: {steps: 3}
train: {steps: 8, budget: 4, eval_every: 4, batch_size: 32}
"""


@pytest.mark.parametrize("extra,message", [
    ("bogus: 1\n", "bogus"),
    ("extract: {mode: svd}\n", "mode: 'svd'"),
    ("methods: [fine]\n", "methods"),
    ("layer_types: [{name: q, pattern: 'nothing\\\\.(\\\\d+)'}]\n", "matches no parameter"),
    ("train: {steps: 8, budget: 9}\n", "budget"),
    ("sigma_phase: {steps: 3, subset: 0}\n", "subset"),
    ("task: {options: {metric: f1}}\n", "metric"),
])
def test_config_errors_exit_2_before_any_work(tmp_path, capsys, extra, message):
    from rayweights.learngene.cli import main

    out = tmp_path / "out"
    rc = main(["--config", _write(tmp_path, BASE + extra), "--output", str(out), "--no-ray"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.startswith("error:")
    assert not out.exists()


def test_config_errors_family_size_and_output(tmp_path, capsys):
    from rayweights.learngene.cli import main

    cfg = _write(tmp_path, BASE)
    assert main(["--config", cfg, "--set", "family=nope", "--output", str(tmp_path / "o"), "--no-ray"]) == 2
    assert "family" in capsys.readouterr().err
    assert main(["--config", cfg, "--set", "targets=[{name: x, size: {width: 7, heads: 2}}]",
                 "--output", str(tmp_path / "o"), "--no-ray"]) == 2
    assert "targets[x]" in capsys.readouterr().err
    assert main(["--config", cfg, "--no-ray"]) == 2
    assert "output" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "missing.yaml"), "--output", str(tmp_path / "o")]) == 2
    assert "missing.yaml" in capsys.readouterr().err


def test_job_runs_sizes_on_ray_and_writes_everything(tmp_path, ray_local):
    from rayweights.learngene.cli import main

    out = tmp_path / "run"
    cfg = _write(tmp_path, BASE + "extract: {mode: diag, learn_steps: 2}\n")
    assert main(["--config", cfg, "--output", str(out), "--quiet"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert [s["name"] for s in res["sizes"]] == ["small", "large"]
    for s in res["sizes"]:
        assert set(s["curves"]) == {"scratch", "fine"}
        assert s["curves"]["fine"]["steps"][-1] == 8 and 4 in s["curves"]["scratch"]["steps"]
        assert s["at_budget"]["scratch"] is not None and s["sigma_params"] > 0
    assert res["storage"]["learngene_bytes"] == Learngene.load(str(out / "learngene")).num_bytes()
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "random init @4" in (out / "report.md").read_text()
    from safetensors.torch import load_file

    sd = load_file(str(out / "inits" / "large" / "model.safetensors"))
    fam = get_model_family("digits_transformer")
    fam.construct({"width": 16, "depth": 2, "heads": 2}).load_state_dict(sd)


def test_job_block_unet_in_process_exports_from_pretrained_folders(tmp_path):
    from rayweights.generators import BlockUNet1D
    from rayweights.learngene.cli import main

    cfg = _write(tmp_path, """name: g
family: block_unet1d
family_options: {preset: tiny, block_size: 32}
task: {options: {data: signals, length: 32, num_train: 128, num_val: 32}}
source: {size: {block_channels: [16, 32], layers_per_block: 1}, steps: 3}
targets:
  - {name: wide, size: {block_channels: [24, 48], layers_per_block: 2}}
extract: {mode: full, energy: 0.9}
methods: [scratch, fine, fine_nosigma]
sigma_phase: {steps: 2}
train: {steps: 4, budget: 2, eval_every: 2, batch_size: 16}
""")
    out = tmp_path / "g"
    assert main(["--config", cfg, "--output", str(out), "--no-ray", "--quiet"]) == 0
    unet = BlockUNet1D.from_pretrained(str(out / "inits" / "wide"))
    assert list(unet.config.block_channels) == [24, 48] and unet.config.layers_per_block == 2
    res = json.loads((out / "results.json").read_text())
    assert res["metric"] == "eps_mse" and not res["higher_is_better"]
    wide = res["sizes"][0]
    assert set(wide["curves"]) == {"scratch", "fine", "fine_nosigma"}
    # the deeper target has middle up-blocks the 1-block source lacks: default init, reported
    assert "u0_conv1_mid" in wide["init"]["uncovered_types"] and wide["init"]["initialised"] > 40
    assert os.path.exists(out / "learngene" / "learngene.json")
