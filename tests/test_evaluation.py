import json
import math
import os

import numpy as np
import pytest
import torch

from evalkit import DigitsTask, tiny_zoo
from rayweights.evaluation import (EvalOptions, FIDError, SmallFeatureExtractor, ZooReference, build_feature_extractor,
                                   compute_fid, evaluate_task, save_images, score_samples, verdict_sentences,
                                   write_report)
from rayweights.evaluation import metrics as M
from rayweights.evaluation.cli import EvaluateConfig, evaluate, main
from rayweights.evaluation.core import Curve, TaskResult, add_group_noise
from rayweights.sampling import GaussianWeightSampler
from rayweights.table import open_zoo


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def zoo_uri(tmp_path_factory):
    return tiny_zoo(tmp_path_factory)


# ----------------------------------------------------------------------------- metric functions by hand
def test_wrong_prediction_iou_by_hand():
    y = np.array([0, 1, 2, 3, 4, 5])
    a = np.array([0, 0, 0, 3, 4, 0])        # wrong at {1, 2, 5}
    b = np.array([1, 1, 0, 3, 0, 5])        # wrong at {0, 2, 4}
    assert M.wrong_set(a, y).tolist() == [1, 2, 5]
    assert M.wrong_iou(a, b, y) == pytest.approx(1 / 5)        # {2} / {0,1,2,4,5}
    assert M.wrong_iou(a, a, y) == 1.0 and M.wrong_iou(y, y, y) == 1.0
    c = np.array([0, 0, 2, 3, 4, 5])        # wrong at {1}
    P = M.pairwise_iou([a, b, c], y)
    assert P[0, 1] == pytest.approx(0.2) and P[0, 2] == pytest.approx(1 / 3) and P[1, 2] == 0.0
    assert np.allclose(P, P.T) and np.all(np.diag(P) == 1)
    best, idx = M.nearest_iou([c], [b, a], y)
    assert best[0] == pytest.approx(1 / 3) and idx[0] == 1


def test_summaries_and_time_to_target_by_hand():
    s = M.summarize([0.5, 0.9, 0.7, float("nan"), 0.6])
    assert s == {"best": 0.9, "avg": pytest.approx(0.675), "median": pytest.approx(0.65), "worst": 0.5, "n": 4}
    s = M.summarize([3.0, 1.0, 2.0], higher_is_better=False)
    assert s["best"] == 1.0 and s["worst"] == 3.0
    curve, wall = [0.1, 0.5, 0.8, 0.7, 0.9], [0.0, 1.0, 2.0, 3.0, 4.0]
    assert M.epochs_to_reach(curve, 0.8) == 2 and M.time_to_reach(curve, wall, 0.8) == 2.0
    assert M.epochs_to_reach(curve, 0.95) is None
    assert M.epochs_to_reach([9.0, 5.0, 3.0], 4.0, higher_is_better=False) == 2
    assert M.epochs_to_reach(curve, 0.85, tol=0.06) == 2
    assert M.speedup(4, 2) == 2.0 and M.speedup(4, 0) == math.inf and M.speedup(None, 2) is None
    assert M.l1_error(torch.zeros(2, 3), torch.full((2, 3), 0.5)) == pytest.approx(0.5)
    assert M.l1_error(np.array([[1.0, -1.0]]), np.array([[0.0, 1.0]])) == pytest.approx(1.5)


def test_nearest_neighbour_distance_by_hand():
    s = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    chunks = [torch.tensor([[1.0, 0.0], [3.0, 0.0]]), torch.tensor([[3.0, 4.5]])]
    d, i = M.nn_distances(s, chunks)
    assert d.tolist() == pytest.approx([1.0, 0.5]) and i.tolist() == [0, 2]
    # groups: a sample never matches rows of its own group
    d, i = M.nn_distances(s, [(chunks[0], ["a", "b"]), (chunks[1], ["b"])], sample_groups=["a", "b"])
    assert d.tolist() == pytest.approx([3.0, 20 ** 0.5]) and i.tolist() == [1, 0]   # (3,4) may only match (1,0)


def test_group_noise_scale(zoo_uri):
    zoo = open_zoo(zoo_uri)
    L = zoo.layout.fit_stats(zoo.blocks())
    base = zoo.blocks(["t0-s0"], last_k=1)[0]
    noisy = add_group_noise(base, L, 0.5, seed=0)
    diff = noisy - base
    assert torch.all(diff[~L.valid_mask] == 0)
    for gi, g in enumerate(L.groups):
        sel = (L.block_group == gi)[:, None] & L.valid_mask
        assert float(diff[sel].std()) == pytest.approx(0.5 * g.std, rel=0.15)


# ----------------------------------------------------------------------------- FID
def _features(extractor, folder):
    from PIL import Image
    from cleanfid.resize import make_resizer

    resize = make_resizer("PIL", False, "bicubic", (64, 64))
    imgs = [resize(np.array(Image.open(os.path.join(folder, f)).convert("RGB"))) for f in sorted(os.listdir(folder))]
    x = torch.tensor(np.stack(imgs)).permute(0, 3, 1, 2).float()
    return extractor(x).numpy().astype(np.float64)


def test_fid_with_small_extractor_matches_hand_computation(tmp_path):
    from scipy import linalg

    g = torch.Generator().manual_seed(0)
    a = torch.rand(48, 3, 24, 24, generator=g)
    b = torch.rand(48, 3, 24, 24, generator=g)
    c = (torch.rand(48, 3, 24, 24, generator=g) * 0.4 + 0.6)        # a brighter, narrower distribution
    for name, x in (("a", a), ("b", b), ("c", c)):
        save_images(x, str(tmp_path / name))
    dim = 8
    fid_ab = compute_fid(str(tmp_path / "a"), str(tmp_path / "b"), f"small:{dim}")
    fid_ac = compute_fid(str(tmp_path / "a"), str(tmp_path / "c"), f"small:{dim}")
    assert compute_fid(str(tmp_path / "a"), str(tmp_path / "a"), f"small:{dim}") == pytest.approx(0, abs=1e-6)
    # by hand: Frechet distance of Gaussians fitted to the extractor's features
    ext = SmallFeatureExtractor(dim)
    fa, fb = _features(ext, str(tmp_path / "a")), _features(ext, str(tmp_path / "b"))
    m1, m2, s1, s2 = fa.mean(0), fb.mean(0), np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    hand = float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
    assert fid_ab == pytest.approx(hand, rel=1e-3)
    assert fid_ac > 5 * fid_ab > 0
    with pytest.raises(FIDError, match="inception-2015-12-05.pt"):
        build_feature_extractor(f"inception:{tmp_path}")
    with pytest.raises(FIDError, match="unknown kind"):
        build_feature_extractor("vgg")
    with pytest.raises(FIDError, match="not a folder of images"):
        compute_fid(str(tmp_path / "a"), str(tmp_path / "nothing"))


# ----------------------------------------------------------------------------- the comparison on a tiny zoo
def test_generated_beats_random_at_epoch0_on_seen_tasks(zoo_uri, tmp_path):
    """Generator = a per-task Gaussian fitted to the zoo (nothing about accuracy is given to it).

    Threshold: on every seen task the generated init's epoch-0 test accuracy exceeds random init's
    by at least 0.3 (random init of a 10-way head on a 5-class task is near chance, ~0.2)."""
    zoo = open_zoo(zoo_uri)
    sampler = GaussianWeightSampler.fit(zoo, rank=4)
    ref = ZooReference(zoo)
    opts = EvalOptions(num_samples=4, epochs=2, iou_members=6)
    results = []
    for cond in zoo.conditions():
        r = evaluate_task(DigitsTask(cond, zoo.layout), sampler, ref, opts, show_progress=False)
        assert r.seen
        assert r.table["generated"]["epoch0"] > r.table["random"]["epoch0"] + 0.3, r.table
        results.append(r)
    r = results[0]
    assert set(r.curves) == {"generated", "random", "pretrained", "best_of_n", "nearest_noise", "soup"}
    assert all(len(c.values) == 3 and len(c.wall) == 3 for c in r.curves.values())
    assert all(c.wall[1] <= c.wall[2] for c in r.curves.values())
    assert r.target == r.curves["random"].values[-1]
    assert r.table["random"]["epochs_to_target"] is not None
    assert r.samples["generated"]["n"] == 4
    assert r.samples["generated"]["best"] >= r.samples["generated"]["median"] >= r.samples["generated"]["worst"]
    # best-of-N is chosen on the training split: its train accuracy is the best train accuracy
    assert "chosen on the training split" in r.table["best_of_n"]["note"]
    mem = r.memorisation
    assert mem["iou_pool"] == "same task" and 0 <= mem["iou_zoo_pairwise_mean"] <= 1
    assert mem["nn_l2_sample_to_zoo"]["n"] == 4 and mem["nn_l2_zoo_to_zoo"]["avg"] > 0
    md = write_report(results, str(tmp_path / "rep"), {"zoo": zoo_uri}, print_table=False)
    assert "(e) nearest zoo ckpt + noise" in md and "## Verdict" in md
    for f in ("report.md", "results.json", "curves-mean.png") + tuple(f"curves-{x.task_id}.png" for x in results):
        assert os.path.getsize(tmp_path / "rep" / f) > 0
    sc = score_samples(DigitsTask(zoo.conditions()[0], zoo.layout), sampler, 3)
    assert sc["n"] == 3 and sc["best"] > sc["random"]


def _fake_result(gen0, e0, f0, genE, eE, fE):
    def curve(name, a, b):
        return Curve(name, "accuracy", [a, b], [[a, b]], [0.0, 1.0], [{}, {}])

    vals = {"generated": (gen0, genE), "random": (0.1, 0.5), "nearest_noise": (e0, eE), "soup": (f0, fE)}
    table = {k: {"epoch0": a, "final": b, "epochs_to_target": 1, "time_to_target": 1.0, "speedup_epochs": 1.0,
                 "speedup_time": 1.0, "init_seconds": 0.0, "note": ""} for k, (a, b) in vals.items()}
    verdict = {}
    for b in ("nearest_noise", "soup", "random"):
        verdict[f"beats_{b}_epoch0"] = table["generated"]["epoch0"] > table[b]["epoch0"]
        verdict[f"beats_{b}_final"] = table["generated"]["final"] > table[b]["final"]
    return TaskResult("t", "c", False, "accuracy", True, 1, {k: curve(k, *v) for k, v in vals.items()}, table, 0.5,
                      {}, {"nn_l2_sample_to_zoo": M.summarize([1.0]), "nn_l2_zoo_to_zoo": M.summarize([1.0])},
                      [], verdict)


def test_verdict_says_plainly_when_baselines_win():
    win = verdict_sentences([_fake_result(0.9, 0.5, 0.4, 0.95, 0.9, 0.9)])
    assert "beat both simple baselines" in " ".join(win)
    lose = " ".join(verdict_sentences([_fake_result(0.6, 0.8, 0.4, 0.9, 0.9, 0.95)]))
    assert "do NOT beat" in lose and "(e) at epoch 0: 0.8000 vs generated 0.6000" in lose
    assert "(f) at epoch 1: 0.9500" in lose


# ----------------------------------------------------------------------------- the job
def test_evaluate_job_end_to_end(ray_local, zoo_uri, tmp_path, capsys):
    gen = str(tmp_path / "gauss")
    GaussianWeightSampler.fit(zoo_uri, rank=4).save(gen)
    out = str(tmp_path / "eval")
    args = ["--set", f"zoo={zoo_uri}", "--set", f"generator={gen}", "--set", "family=tests.evalkit:make_adapter",
            "--set", "allow_import=true",
            "--set", 'tasks=["digits:0,1,2,3,4", "digits:1,3,5,7,9"]', "--set", "num_samples=3",
            "--set", "epochs=2", "--set", "iou_members=4", "--output", out]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "## Verdict" in printed and "held out" in printed and "seen by the generator" in printed
    res = json.load(open(os.path.join(out, "results.json")))
    assert [t["task_id"] for t in res["tasks"]] == ["digits-01234", "digits-13579"]
    assert os.path.exists(os.path.join(out, "samples", "samples.json"))
    assert os.path.getsize(os.path.join(out, "curves-digits-13579.png")) > 0
    # reuse the samples folder
    out2 = str(tmp_path / "eval2")
    summary = evaluate(EvaluateConfig(zoo=zoo_uri, samples=os.path.join(out, "samples"),
                                      family="tests.evalkit:make_adapter", allow_import=True, tasks=["digits:1,3,5,7,9"],
                                      num_samples=3,
                                      epochs=1, parallel=False, inits=["generated", "random", "soup"], output=out2),
                       show_progress=False, print_table=False)
    assert set(summary["tasks"]["digits-13579"]) == {"generated", "random", "soup"}
    # bad input: error naming the field, exit 2, nothing written
    bad = str(tmp_path / "bad")
    for extra, word in ((["--set", "family=nope"], "family"), (["--set", "epochs=0"], "epochs"),
                        (["--set", "zoo=/no/such/zoo"], "zoo"), (["--set", "tasks=[]"], "tasks"),
                        (["--set", "inits=[generated]"], "random")):
        assert main(args[:-1] + [bad] + extra) == 2
        assert word in capsys.readouterr().err
        assert not os.path.exists(bad)


# ----------------------------------------------------------------------------- built-in families on real zoos
@pytest.fixture(scope="module")
def built_zoo(tmp_path_factory):
    """A zoo written by rayweights.zoo's builder (dataset-subsets, MLP-3): 2 tasks x 2 members."""
    from rayweights.config import load_config
    from rayweights.zoo import ZooSpec, build_zoo

    uri = str(tmp_path_factory.mktemp("built") / "zoo")
    spec = load_config(ZooSpec, os.path.join(os.path.dirname(__file__), "..", "jobs", "specs", "tiny.yaml"),
                       ["max_tasks=2", "members_per_task=2", "hparams.epochs=[4,4]", "keep_last=2", f"output={uri}"])
    build_zoo(spec, use_ray=False)
    return uri


def test_dataset_subsets_adapter_on_a_built_zoo(built_zoo, tmp_path):
    from rayweights.evaluation import make_adapter
    from rayweights.evaluation.cli import EvaluateConfig, resolve_defaults
    from rayweights.evaluation.families import position_similarity

    zoo = open_zoo(built_zoo)
    cfg = resolve_defaults(EvaluateConfig(zoo=built_zoo))
    assert cfg.family == "dataset-subsets" and cfg.tasks == ["digits:0,1,2,5,6", "digits:3,4,7,8,9"]
    seen = zoo.conditions()[0]
    ad = make_adapter("dataset-subsets", seen, zoo)
    # a zoo member's own weights reproduce its recorded validation accuracy through the adapter
    mid = zoo.members.column("member_id")[0].as_py()
    step, sd = zoo.state_dicts(mid)[-1]
    model = ad.build_model(0)
    ad.load_layout_state_dict(model, sd)
    assert ad.evaluate(model)["accuracy"] == pytest.approx(zoo.metrics(mid)[-1]["val_acc"], abs=1e-6)
    assert ad.evaluate(ad.build_model(0))["accuracy"] < 0.5
    # similarity: same head positions and overlap
    assert position_similarity((0, 1, 2, 3, 4), (0, 1, 2, 3, 4)) == 1.0
    assert position_similarity((0, 1, 2, 3, 4), (0, 1, 2, 5, 6)) == pytest.approx(0.5 * 3 / 5 + 0.5 * 3 / 7)
    assert ad.similarity("digits:0,1,2,3,4") > ad.similarity("digits:5,6,7,8,9") == 0.0
    with pytest.raises(Exception, match="classes"):
        make_adapter("dataset-subsets", "digits:0,1", zoo)
    # a fine-tuning epoch from random init improves the task's accuracy
    m = ad.build_model(1)
    opt = ad.make_optimizer(m)
    before = ad.evaluate(m)["accuracy"]
    for e in range(1, 4):
        ad.train_epoch(m, opt, e, 0)
    assert ad.evaluate(m)["accuracy"] > before + 0.3
    # the whole comparison runs on the zoo's held-out task with a generator fitted to it
    r = evaluate_task(make_adapter("dataset-subsets", cfg.tasks[0], zoo), GaussianWeightSampler.fit(zoo, rank=2),
                      ZooReference(zoo), EvalOptions(num_samples=2, epochs=1, iou_members=4), show_progress=False)
    assert not r.seen and set(r.table) == set(["generated", "random", "pretrained", "best_of_n", "nearest_noise",
                                               "soup"])
    assert "digits" in r.table["pretrained"]["note"]


@pytest.fixture(scope="module")
def partial_zoo(tmp_path_factory):
    from rayweights.config import load_config
    from rayweights.zoo import ZooSpec, build_zoo

    uri = str(tmp_path_factory.mktemp("pzoo") / "zoo")
    spec = load_config(ZooSpec, os.path.join(os.path.dirname(__file__), "..", "jobs", "specs", "partial_bn.yaml"),
                       ["max_tasks=1", "members_per_task=2", "base_epochs=2", "keep_last=3", f"output={uri}"])
    build_zoo(spec, use_ray=False)
    return uri


def test_partial_adapter_fine_tunes_only_the_generated_part(partial_zoo):
    from rayweights.evaluation import make_adapter

    zoo = open_zoo(partial_zoo)
    ad = make_adapter("partial", zoo.conditions()[0], zoo)
    base = ad.pretrained_state_dict()
    assert set(base) == set(zoo.layout.param_names)
    m = ad.build_model(0)
    ad.make_optimizer(m)
    assert {n for n, p in m.named_parameters() if p.requires_grad} == set(zoo.layout.param_names)
    # a member's stored BN weights on the rebuilt base beat the architecture's default BN init
    step, sd = zoo.state_dicts(zoo.members.column("member_id")[0].as_py())[-1]
    ad.load_layout_state_dict(m, sd)
    assert ad.evaluate(m)["accuracy"] > 0.4
    with pytest.raises(Exception, match="family"):
        make_adapter("dataset-subsets", zoo.conditions()[0], zoo)


def test_partial_zoo_members_are_reproducible(partial_zoo):
    """base model + a member's stored weights must reproduce the member's recorded validation accuracy."""
    from rayweights.evaluation import make_adapter

    zoo = open_zoo(partial_zoo)
    ad = make_adapter("partial", zoo.conditions()[0], zoo)
    for mid in zoo.members.column("member_id").to_pylist():
        step, sd = zoo.state_dicts(mid)[-1]
        m = ad.build_model(0)
        ad.load_layout_state_dict(m, sd)
        assert ad.evaluate(m)["accuracy"] == pytest.approx(zoo.metrics(mid)[-1]["val_acc"], abs=1e-6)


def test_family_options_typos_fail_at_load_naming_the_key():
    from rayweights.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"family_options\.lrr: unknown option for family 'dataset-subsets'"):
        load_config(EvaluateConfig, None, ["family=dataset-subsets", "family_options={lrr: 0.1}"])
    with pytest.raises(ConfigError, match=r"family_options\.metric: unknown option for family 'partial'"):
        load_config(EvaluateConfig, None, ["family=partial", "family_options={metric: l1}"])
    with pytest.raises(ConfigError, match=r"family_options\.optimiser: unknown option for any built-in family"):
        load_config(EvaluateConfig, None, ["family_options={optimiser: sgd}"])        # the zoo's family, later
    assert load_config(EvaluateConfig, None, ["family=concepts", "family_options={metric: l1, fid: false}"])
    assert load_config(EvaluateConfig, None, ["family_options={lr: 0.01}"]).family_options == {"lr": 0.01}


def test_comparison_table_counts_reached_targets_and_takes_median_speedups():
    """The pipeline's summary: per initialisation, how many tasks reached random's final value and the
    median speed-up over them, an infinite one (reached at epoch 0, written as null) included."""
    from rayweights.evaluation.report import comparison_table

    def row(e0, fin, ep, sp, t, spt):
        return {"epoch0": e0, "final": fin, "epochs_to_target": ep, "speedup_epochs": sp,
                "time_to_target": t, "speedup_time": spt}

    tasks = [{"condition": c, "metric": "fid", "epochs": 4, "samples": {"generated": {"n": 2, "best": 1, "avg": 2,
                                                                                       "median": 2}},
              "table": {"random": row(9, 5, 4, 1.0, 2.0, 1.0), "generated": g}}
             for c, g in (("a", row(6, 4, 2, 2.0, 1.5, 4 / 3)), ("b", row(4, 3, 0, None, 0.0, None)),
                          ("c", row(8, 6, None, None, None, None)))]
    md = comparison_table({"tasks": tasks, "verdict": []})
    gen = next(line for line in md.splitlines() if line.startswith("| (a) generated"))
    assert gen.split("|")[4:7] == [" 2/3 ", " ∞ ", " ∞ "]          # median of {2, inf} is inf
    rnd = next(line for line in md.splitlines() if line.startswith("| (b) random"))
    assert rnd.split("|")[4:7] == [" 3/3 ", " 1.00 ", " 1.00 "]
