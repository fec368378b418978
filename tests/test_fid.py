"""The trained edit-op feature extractor (``trained:<path>``) and FID/KID with it (rayweights.evaluation.fid),
and the ``concepts`` evaluation's FID/KID: the zoo's trained extractor on 512-image metric sets.

One extractor is trained per module (``ensure_trained_extractor``, 1920 16x16 images, 800 steps, ~15 s
on one thread) and shared by the tests; the concepts tests build a tiny zoo whose own extractor the first
adapter trains (another ~15 s)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from rayweights.evaluation import (FIDError, TrainedFeatureExtractor, build_feature_extractor, compute_fid,
                                   compute_kid, edit_op_training_set, ensure_trained_extractor, feature_metrics,
                                   image_features, image_metrics, save_images, zoo_extractor_spec)
from rayweights.evaluation import fid as fid_module
from rayweights.evaluation.fid import REPORT_FILE
from rayweights.zoo.editor import concept_by_key, make_images

pytestmark = pytest.mark.usefixtures("torch_one_thread")

N = 200          # images per set in the ranking test


@pytest.fixture(scope="module")
def extractor_dir(tmp_path_factory, torch_one_thread):
    path = str(tmp_path_factory.mktemp("fid") / "extractor")
    ensure_trained_extractor(path, image_size=16, seed=0)
    return path


def test_training_set_holds_identity_and_every_single_op():
    x, y, names = edit_op_training_set(3, image_size=16, seed=0)
    assert names[0] == "identity" and "blur_1" in names and not any("__" in n for n in names)
    assert x.shape == (3 * len(names), 3, 16, 16) and 0 <= x.min() and x.max() <= 1
    assert y.tolist() == [i for i in range(len(names)) for _ in range(3)]
    blur = names.index("blur_1")
    torch.testing.assert_close(x[3 * blur:3 * blur + 3], concept_by_key("blur_1").apply(
        make_images(3 * len(names), 16, seed=0)[3 * blur:3 * blur + 3]))


@pytest.mark.slow
def test_trained_extractor_classifies_held_out_edits_far_above_chance(extractor_dir):
    """Measured (seed 0, 48 classes: identity + 47 single ops, 384 held-out images): accuracy 0.326,
    chance 0.021.  Many ops are indistinguishable on one image whose source is unknown (hue rotations and
    channel swaps of random colours, flip_h, identity), which bounds any classifier well below 1."""
    import json

    with open(os.path.join(extractor_dir, REPORT_FILE)) as f:
        rep = json.load(f)
    assert rep["num_classes"] == 48 and rep["n_holdout"] == 384 and rep["chance"] == pytest.approx(1 / 48)
    assert rep["accuracy"] >= 0.25           # 12x chance; measured 0.326
    model = build_feature_extractor(f"trained:{extractor_dir}")[0]
    assert isinstance(model, TrainedFeatureExtractor) and model.config.class_names[0] == "identity"
    assert model(torch.rand(5, 3, 16, 16) * 255).shape == (5, 64)      # features, not the 48 logits
    assert model(torch.rand(2, 3, 40, 40) * 255).shape == (2, 64)      # other sizes: resized inside


def _sets(root, a: str, b: str, n: int = N) -> dict[str, str]:
    s1, s2 = make_images(n, 16, seed=501), make_images(n, 16, seed=502)
    out = {}
    for name, x in (("src1", s1), ("a1", concept_by_key(a).apply(s1)), ("a2", concept_by_key(a).apply(s2)),
                    ("b2", concept_by_key(b).apply(s2))):
        out[name] = str(root / f"{a}-{b}-{name}")
        save_images(x, out[name])
    return out


@pytest.mark.slow
def test_trained_fid_and_kid_rank_same_op_below_a_different_op(extractor_dir, tmp_path):
    """Two disjoint sets of one op score far lower than that op vs another, for FID and KID.
    Measured FID ratios (A vs B / same op, n = 200 per set), trained vs random ``small``: blur_1/sharpen
    133.7 vs 5.2, grayscale/sepia 155.7 vs 101.8, warm/cool 19.2 vs 21.9.  Asserted: every trained ratio
    > 10, and on blur vs sharpen (filters the random extractor barely separates) > 5x the random one's."""
    trained = f"trained:{extractor_dir}"
    ratios = {}
    for a, b in (("blur_1", "sharpen"), ("grayscale", "sepia"), ("warm", "cool")):
        d = _sets(tmp_path, a, b)
        for spec in (trained, "small"):
            same, diff = image_metrics(d["a1"], d["a2"], spec), image_metrics(d["a1"], d["b2"], spec)
            ratios[spec, a] = diff["fid"] / same["fid"]
            if spec == trained:
                assert diff["kid"] > 10 * abs(same["kid"])
                assert image_metrics(d["src1"], d["a2"], spec)["fid"] > 2 * same["fid"]   # source vs edited
    print({(s.split(":")[0], a): round(r, 1) for (s, a), r in ratios.items()})
    for a in ("blur_1", "grayscale", "warm"):
        assert ratios[trained, a] > 10
    # where the random extractor is much weaker: blur vs sharpen
    assert ratios[trained, "blur_1"] > 5 * ratios["small", "blur_1"]


def test_save_load_round_trip_and_missing_folder(extractor_dir, tmp_path):
    x = make_images(6, 16, seed=7) * 255
    model = TrainedFeatureExtractor.from_pretrained(extractor_dir, low_cpu_mem_usage=False).eval()
    model.save_pretrained(str(tmp_path / "copy"), safe_serialization=True)
    assert os.path.isfile(tmp_path / "copy" / "diffusion_pytorch_model.safetensors")
    again = build_feature_extractor(f"trained:{tmp_path / 'copy'}")[0]
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FIDError, match=f"trained:{missing}: no such folder"):
        build_feature_extractor(f"trained:{missing}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FIDError, match="empty is not a model folder"):
        build_feature_extractor(f"trained:{tmp_path / 'empty'}")


def test_ensure_trained_extractor_trains_once_then_loads(tmp_path, monkeypatch):
    path = str(tmp_path / "ext")
    calls = []
    train = fid_module.train_feature_extractor

    def counting(*args, **kwargs):
        calls.append(1)
        return train(*args, **kwargs)

    monkeypatch.setattr(fid_module, "train_feature_extractor", counting)
    first = ensure_trained_extractor(path, image_size=16, n_per_op=2, steps=5)
    assert calls == [1] and sorted(os.listdir(tmp_path)) == ["ext"]          # no temporary folder left
    second = ensure_trained_extractor(path, image_size=16, n_per_op=2, steps=5)
    assert calls == [1]                                                       # loaded, not retrained
    x = make_images(4, 16, seed=3) * 255
    with torch.no_grad():
        torch.testing.assert_close(second(x), first(x), rtol=0, atol=0)
    with pytest.raises(FIDError, match="local folder only"):
        ensure_trained_extractor("s3://bucket/ext", image_size=16)


def test_image_metrics_reports_counts_and_matches_compute_fid_and_kid(extractor_dir, tmp_path):
    save_images(make_images(30, 16, seed=1), str(tmp_path / "a"))
    save_images(concept_by_key("sepia").apply(make_images(20, 16, seed=2)), str(tmp_path / "b"))
    spec = f"trained:{extractor_dir}"
    m = image_metrics(str(tmp_path / "a"), str(tmp_path / "b"), spec)
    assert (m["n_a"], m["n_b"], m["extractor"]) == (30, 20, spec)
    assert m["fid"] == pytest.approx(compute_fid(str(tmp_path / "a"), str(tmp_path / "b"), spec), rel=1e-6)
    assert m["kid"] == pytest.approx(compute_kid(str(tmp_path / "a"), str(tmp_path / "b"), spec), rel=1e-9)
    assert image_metrics(str(tmp_path / "a"), str(tmp_path / "b"), "small:8")["extractor"] == "small:8"
    with pytest.raises(FIDError, match="not a folder of images"):
        compute_kid(str(tmp_path / "a"), str(tmp_path / "nothing"), spec)


# ----------------------------------------------------------------------------- in-memory features, KID shortcut
@pytest.mark.parametrize("spec", ["trained", "small:8"])
def test_image_features_equal_clean_fids_folder_features(extractor_dir, tmp_path, spec):
    """In-memory features (no PNGs) are clean-fid's features of the saved folder: the trained extractor at
    its own size (resize skipped: PIL returns the image unchanged) and ``small`` (a real 16 -> 64 resize)."""
    from cleanfid import fid

    spec = f"trained:{extractor_dir}" if spec == "trained" else spec
    x = concept_by_key("sepia").apply(make_images(40, 16, seed=11)) * 2 - 1       # [-1, 1], as generators give
    save_images(x, str(tmp_path / "x"))
    model, resize = build_feature_extractor(spec)
    ref = fid.get_folder_features(str(tmp_path / "x"), model, num_workers=0, batch_size=16, device=torch.device("cpu"),
                                  custom_fn_resize=resize, verbose=False)
    got = image_features(x, (model, resize), batch_size=16)
    assert got.shape == ref.shape == (40, model(torch.zeros(1, 3, 16, 16)).shape[1])
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_kid_with_equal_counts_is_clean_fids_100_subset_kid(extractor_dir):
    """Equal counts <= 1000: every clean-fid subset is a permutation of all images, so one subset gives
    the 100-subset value (float32 summation order aside)."""
    from cleanfid import fid

    spec = f"trained:{extractor_dir}"
    fa = image_features(make_images(60, 16, seed=21), spec)
    fb = image_features(concept_by_key("warm").apply(make_images(60, 16, seed=22)), spec)
    full = fid.kernel_distance(fa, fb)               # 100 subsets
    assert feature_metrics(fa, fb)["kid"] == pytest.approx(full, rel=1e-4)
    assert feature_metrics(fa, fb[:50])["n_b"] == 50            # unequal counts: clean-fid's subsets as they are
    with pytest.raises(FIDError, match="at least 2 images"):
        feature_metrics(fa, fb[:1])


# ----------------------------------------------------------------------------- the concepts evaluation's FID/KID
@pytest.fixture(scope="module")
def concepts_zoo(tmp_path_factory):
    """A tiny procedural concepts zoo (2 tasks x 1 member, 16x16 images) — no extractor yet."""
    from test_zoo_families import CONCEPTS, _tiny_concepts

    from rayweights.config import load_config
    from rayweights.zoo import ZooSpec, build_zoo

    out = tmp_path_factory.mktemp("czoo") / "zoo"
    s = load_config(ZooSpec, CONCEPTS, _tiny_concepts(out) + ['tasks=["give it a red tint", "grayscale"]',
                                                              "held_out=[]", "held_out_every=0"])
    res = build_zoo(s, use_ray=False, progress=False)
    assert res.done == 2 and res.failed == 0, res.failures
    return str(out)


class _Fixed(torch.nn.Module):
    """An image translator with no weights: ``fn`` on [0, 1] images (the generator's [-1, 1] in and out)."""

    noise_channels = 1

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, z):
        return self.fn((x + 1) / 2) * 2 - 1


def _member(zoo, adapter, condition):
    """The adapter's model with the zoo member of ``condition`` loaded (its last checkpoint)."""
    rows = zoo.members.to_pylist()
    mid = next(r["member_id"] for r in rows if r["condition"] == condition)
    sd = zoo.state_dicts(mid)[-1][1]
    model = adapter.build_model(0)
    adapter.load_layout_state_dict(model, {n: sd[n] for n in adapter.layout.param_names})
    return model


def test_concepts_fid_uses_the_zoos_trained_extractor_and_separates_right_from_wrong(concepts_zoo, monkeypatch):
    """The concepts adapter's default FID/KID: the zoo's trained extractor (trained once into
    <zoo>/extractor, then loaded), 512 generated vs 512 target images.  Measured (seed 0): FID of the
    exact edit 0.0, the grayscale member 51, the base generator 406, the red-tint member 1123, identity
    1587; KID in the same order."""
    from rayweights.evaluation import AdapterError, make_adapter
    from rayweights.table import open_zoo

    calls = []
    train = fid_module.train_feature_extractor
    monkeypatch.setattr(fid_module, "train_feature_extractor", lambda *a, **k: calls.append(1) or train(*a, **k))
    zoo = open_zoo(concepts_zoo)
    ext = os.path.join(concepts_zoo, "extractor")
    gray = next(c for c in zoo.conditions() if concept_by_key("grayscale").prompts[0] == c)
    ad = make_adapter("concepts", gray, zoo, {})
    assert calls == [1] and os.path.isfile(os.path.join(ext, "config.json"))
    weights = os.path.join(ext, "diffusion_pytorch_model.safetensors")
    mtime = os.stat(weights).st_mtime_ns
    assert ad.feature_extractor == f"trained:{ext}"
    info = ad.metric_info["fid"]
    assert (info["extractor"], info["n_generated"], info["n_target"]) == (f"trained:{ext}", 512, 512)
    assert "not Inception FID" in info["label"] and ad.report_metrics == ["fid", "kid", "psnr"]

    scores = {name: ad.evaluate(model) for name, model in (
        ("exact", _Fixed(concept_by_key("grayscale").apply)), ("member", _member(zoo, ad, gray)),
        ("base", ad.build_model(0)), ("wrong member", _member(zoo, ad, concept_by_key("tint_red").prompts[0])),
        ("identity", _Fixed(lambda x: x)))}
    print({k: (round(v["fid"], 1), round(v["kid"], 1)) for k, v in scores.items()})
    for m in scores.values():
        assert (m["fid_n_generated"], m["fid_n_target"]) == (512, 512)
    fid_ = {k: v["fid"] for k, v in scores.items()}
    assert fid_["exact"] < 1e-3 and fid_["member"] > 10 * max(fid_["exact"], 1.0)
    assert 4 * fid_["member"] < fid_["base"] < fid_["wrong member"] < fid_["identity"]
    kid = {k: v["kid"] for k, v in scores.items()}
    assert kid["exact"] < kid["member"] < kid["base"] < kid["wrong member"] < kid["identity"]
    # the reference features are made once per split; the test metric set is not the validation pairs
    src, ref = ad.metric_set("test")
    assert ad.metric_set("test")[1] is ref and src.shape == (512, 3, 16, 16)
    assert not any(torch.equal(s, v) for v in ad.split["test"][0] for s in src[:32])

    # a second adapter loads the extractor: no training, the folder untouched
    again = make_adapter("concepts", gray, zoo, {"fid_images": 64})
    assert calls == [1] and os.stat(weights).st_mtime_ns == mtime
    assert again.evaluate(_Fixed(concept_by_key("grayscale").apply))["fid_n_target"] == 64
    small = make_adapter("concepts", gray, zoo, {"feature_extractor": "small:16", "fid_images": 64})
    assert "random network, not FID" in small.metric_info["kid"]["label"]
    assert make_adapter("concepts", gray, zoo, {"fid": False}).metric_info == {}
    for bad in (1, 2.5, True):
        with pytest.raises(AdapterError, match="family_options.fid_images"):
            make_adapter("concepts", gray, zoo, {"fid_images": bad})
    with pytest.raises(AdapterError, match="family_options.feature_extractor"):
        make_adapter("concepts", gray, zoo, {"feature_extractor": f"trained:{concepts_zoo}/nowhere"})


def test_concepts_report_names_the_extractor_and_counts_next_to_fid(concepts_zoo, tmp_path):
    """Through evaluate_task and write_report: per-epoch fid/kid with their counts, the extractor and the
    counts in report.md, results.json and the plot; a member's weights as the "generated" sample score a
    far lower FID than the base generator (random init) at epoch 0."""
    import json

    from rayweights.evaluation import EvalOptions, ZooReference, evaluate_task, make_adapter, write_report
    from rayweights.table import open_zoo

    zoo = open_zoo(concepts_zoo)
    gray = concept_by_key("grayscale").prompts[0]
    ad = make_adapter("concepts", gray, zoo, {})
    member = _member(zoo, ad, gray)

    class MemberSampler:
        layout, normalized = zoo.layout, False

        def sample(self, condition, n, seed=0):
            return zoo.layout.tokenize(ad.layout_state_dict(member)).unsqueeze(0).repeat(n, 1, 1)

    r = evaluate_task(ad, MemberSampler(), ZooReference(zoo),
                      EvalOptions(num_samples=1, epochs=1, inits=["random", "generated"], iou_members=0),
                      show_progress=False)
    ext = f"trained:{os.path.join(concepts_zoo, 'extractor')}"
    assert r.extra_metrics == ["fid", "kid", "psnr"] and r.metric_info["fid"]["extractor"] == ext
    for c in r.curves.values():
        assert all((e["fid_n_generated"], e["fid_n_target"]) == (512, 512) for e in c.all_metrics)
    assert 4 * r.table["generated"]["fid_epoch0"] < r.table["random"]["fid_epoch0"]
    md = write_report([r], str(tmp_path), {"zoo": concepts_zoo}, print_table=False)
    assert "fid (n=512/512) epoch 0" in md and "kid (n=512/512) epoch 1" in md
    assert f"**fid** and **kid** (every epoch, every row): extractor `{ext} (edit-operation CNN" in md
    assert "512 generated vs 512 target images" in md
    res = json.load(open(tmp_path / "results.json"))
    assert res["tasks"][0]["metric_info"]["kid"]["n_target"] == 512
    assert res["tasks"][0]["curves"]["random"]["all_metrics"][1]["fid_n_generated"] == 512
    assert os.path.isfile(tmp_path / f"curves-{r.task_id}.png")


def test_zoo_extractor_on_s3_trains_once_into_the_cache_and_uploads(s3_uri, tmp_path, monkeypatch):
    """An s3:// zoo: the extractor is trained in the local cache (keyed by the zoo), uploaded to
    <zoo>/extractor/, and loaded from there afterwards (no second training, even with the cache gone)."""
    import shutil

    from rayweights.storage import exists, resolve

    monkeypatch.setenv("RAYWEIGHTS_CACHE", str(tmp_path / "cache"))
    calls = []
    train = fid_module.train_feature_extractor
    monkeypatch.setattr(fid_module, "train_feature_extractor",
                        lambda *a, **k: calls.append(1) or train(*a, **{**k, "steps": 5}))
    spec = zoo_extractor_spec(s3_uri, 16)
    assert spec == f"trained:{s3_uri}/extractor" and calls == [1]
    assert exists(resolve(f"{s3_uri}/extractor/config.json"))
    assert len(os.listdir(tmp_path / "cache" / "extractors")) == 1
    shutil.rmtree(tmp_path / "cache")
    assert zoo_extractor_spec(s3_uri, 16) == spec and calls == [1]
    model = build_feature_extractor(spec)[0]
    assert isinstance(model, TrainedFeatureExtractor) and model.config.image_size == 16


def test_the_concepts_evaluate_config_chooses_the_zoos_trained_extractor():
    from rayweights.config import ConfigError, load_config
    from rayweights.evaluation.cli import EvaluateConfig, _family_options

    path = os.path.join(os.path.dirname(__file__), "..", "jobs", "configs", "evaluate_concepts.yaml")
    cfg = load_config(EvaluateConfig, path, ["generator=runs/x/export"])
    assert cfg.family == "concepts" and cfg.feature_extractor == "trained" == EvaluateConfig().feature_extractor
    assert _family_options(cfg) == {"metric": "l1", "fid": True, "fid_images": 512, "feature_extractor": "trained"}
    with pytest.raises(ConfigError, match="family_options.fid_imgs"):
        load_config(EvaluateConfig, path, ["family_options={fid_imgs: 512}"])


@pytest.mark.slow
def test_concepts_fid_with_a_diffusers_editor_uses_the_cached_validation_pairs(tmp_path):
    """A diffusers editor has no procedural edit for fresh sources: the metric set is the split's cached
    pairs and the counts (12 * 0.2 -> 2 validation pairs here) say so."""
    from test_zoo_families import CONCEPTS, _tiny_concepts, _tiny_ip2p

    from rayweights.config import load_config
    from rayweights.evaluation import make_adapter
    from rayweights.table import open_zoo
    from rayweights.zoo import ZooSpec, build_zoo

    pipe, out = tmp_path / "ip2p", tmp_path / "zoo"
    _tiny_ip2p(pipe)
    s = load_config(ZooSpec, CONCEPTS, _tiny_concepts(out) + [
        "concepts.num_images=12", "hparams.epochs=[2,2]", "keep_last=1", f"concepts.editor=diffusers:{pipe}",
        "concepts.editor_options={num_inference_steps: 2}", 'tasks=["make it look like a watercolor"]',
        "held_out=[]", "held_out_every=0"])
    assert build_zoo(s, use_ray=False, progress=False).done == 1
    ad = make_adapter("concepts", "make it look like a watercolor", open_zoo(str(out)), {"feature_extractor": "small:16"})
    n = len(ad.split["test"][0])
    info = ad.metric_info["fid"]
    assert (info["n_generated"], info["n_target"]) == (n, n) and "cached validation pairs only" in info["images"]
    m = ad.evaluate(ad.build_model(0))
    assert (m["fid_n_generated"], m["fid_n_target"]) == (n, n) and m["fid"] >= 0
    assert ad.metric_set("test")[0] is ad.split["test"][0]


def test_extractor_weights_do_not_depend_on_the_thread_count(tmp_path):
    """A driver and a Tune trial run with different thread counts: the zoo's extractor they train must
    be the same network, or their FIDs do not compare."""
    from rayweights.evaluation.fid import ensure_trained_extractor

    threads = torch.get_num_threads()
    try:
        sds = []
        for n in (1, 2):
            torch.set_num_threads(n)
            sds.append(ensure_trained_extractor(str(tmp_path / f"t{n}"), 16, n_per_op=4, steps=30).state_dict())
            assert torch.get_num_threads() == n               # restored after training
    finally:
        torch.set_num_threads(threads)
    assert sds[0].keys() == sds[1].keys() and all(torch.equal(sds[0][k], sds[1][k]) for k in sds[0])


def test_a_retokenised_zoo_uses_its_source_zoos_extractor(tmp_path, monkeypatch):
    from rayweights.evaluation import fid

    made = []
    monkeypatch.setattr(fid, "ensure_trained_extractor", lambda path, size: made.append((path, size)))
    src, dst = tmp_path / "zoo", tmp_path / "zoo-b128-r1"
    for d, meta in ((src, {}), (dst, {"retokenized_from": str(src)})):
        d.mkdir()
        (d / "zoo_spec.json").write_text(json.dumps(meta))
    assert fid.zoo_extractor_spec(str(dst), 16) == f"trained:{src / 'extractor'}"
    assert made == [(str(src / "extractor"), 16)]
    # a source that is gone: the zoo makes its own
    (src / "zoo_spec.json").unlink()
    assert fid.zoo_extractor_spec(str(dst), 16) == f"trained:{dst / 'extractor'}"
