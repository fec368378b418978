"""Unit tests of rayweights.zoo's pieces without Ray: architectures, LoRA, the concept editor and
vocabulary, data loaders (ImageFolder, Parquet, torchvision refusal, CLIP features), the
diffusers editor with a tiny random InstructPix2Pix pipeline, specs and task planning."""

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from rayweights.blocks import WeightLayout
from rayweights.config import ConfigError, load_config
from rayweights.zoo import ZooSpec, build_zoo, plan_tasks
from rayweights.zoo import architectures as A
from rayweights.zoo import editor as E
from rayweights.zoo import families as F
from rayweights.zoo.families import data as D

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "jobs" / "specs" / "tiny.yaml"
CONCEPTS = ROOT / "jobs" / "specs" / "concepts.yaml"


# ----------------------------------------------------------------------------- architectures
def test_architectures_registry_shapes_and_pdiff_sizes():
    assert {"mlp3", "convnet3", "resnet_small", "e2gan_lora", "patchgan"} <= set(A.ARCHITECTURES)
    assert A.ARCH_KINDS["mlp3"] == "classifier" and A.ARCH_KINDS["e2gan_lora"] == "image2image"
    x = torch.randn(4, 1, 8, 8)
    for name in ("mlp3", "convnet3", "resnet_small"):
        assert A.build(name, (1, 8, 8), 5)(x).shape == (4, 5)
    # p-diff Tab. 3b MLP-3 on CIFAR-10: 3072-50-25-10, no BN
    m = A.build("mlp3", (3, 32, 32), 10, hidden=[50, 25], norm=False)
    assert sum(p.numel() for p in m.parameters()) == 3072 * 50 + 50 + 50 * 25 + 25 + 25 * 10 + 10
    assert not any(isinstance(mod, torch.nn.BatchNorm1d) for mod in m.modules())
    with pytest.raises(KeyError, match="architecture"):
        A.build("vit9000", (1, 8, 8), 5)
    with pytest.raises(ValueError, match="mlp3"):
        A.build("convnet3", (24,), 5)            # feature vectors need an MLP


def test_concept_generator_lora_layout_and_zero_init():
    torch.manual_seed(0)
    G = A.build("e2gan_lora", (3, 16, 16), 3, width=4, res_blocks=1)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = torch.randn(2, 1, 16, 16)
    G.eval()
    y = G(x, z)
    assert y.shape == x.shape and y.abs().max() <= 1
    # LoRA up starts at zero: removing every adapter's contribution changes nothing
    for mod in G.modules():
        if hasattr(mod, "lora_up"):
            assert torch.count_nonzero(mod.lora_up.weight) == 0
    # the concepts layout keeps LoRA down, up, then the layer's BN, per layer (grouping rule 1)
    L = WeightLayout.from_state_dict(G.state_dict(), rule=1, block_size=64, select=A.CONCEPT_SELECT)
    g0 = L.groups[0]
    assert g0.name == "stem.conv" and g0.params == ("stem.conv.lora_down.weight", "stem.conv.lora_up.weight",
                                                    "stem.norm.weight", "stem.norm.bias")
    assert not any(".base." in n or "running" in n for n in L.param_names)
    assert any(n.startswith("attn.q.lora") for n in L.param_names)      # the transformer block too
    # training the up weights changes the output
    G.out.lora_up.weight.data.fill_(0.1)
    assert not torch.allclose(G(x, z), y)
    d = A.build("patchgan", (6, 16, 16), 1)
    assert d(x, y).shape[:2] == (2, 1)
    with pytest.raises(ValueError, match="ranks"):
        A.build("e2gan_lora", (3, 16, 16), 3, ranks={"bogus": 2})


# ----------------------------------------------------------------------------- editor
def test_operations_are_real_image_operations():
    x = E.make_images(6, 16, seed=3)
    op = lambda k: E.OPS[k][1]
    assert torch.allclose(op("invert")(op("invert")(x)), x)
    g = op("grayscale")(x)
    assert torch.allclose(g[:, 0], g[:, 1]) and torch.allclose(g[:, 1], g[:, 2])
    assert torch.equal(op("flip_h")(x), x.flip(-1))
    r = x
    for _ in range(4):
        r = op("rot_90")(r)
    assert torch.equal(r, x)
    assert len(torch.unique(op("posterize_3")(x))) <= 3
    assert op("blur_2")(x).std() < x.std() and op("sharpen")(x).std() > x.std()
    sep = op("sepia")(torch.ones(1, 3, 1, 1))
    assert torch.allclose(sep.flatten(), torch.tensor([1.351, 1.203, 0.937]), atol=1e-3)
    h = op("hue_p180")(torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1))     # red -> cyan
    assert torch.allclose(h.flatten(), torch.tensor([0.0, 1.0, 1.0]), atol=1e-5)
    e = op("edges")(torch.cat([torch.zeros(1, 3, 8, 4), torch.ones(1, 3, 8, 4)], -1))
    assert e[0, 0, :, 3:5].min() > 0.5 and e[0, 0, :, :2].max() == 0


def test_concept_vocabulary_hundreds_distinct_and_prompt_roundtrip():
    cs = E.all_concepts()
    assert len(cs) >= 500 and sum(len(c.ops) == 1 for c in cs) >= 40
    prompts = [p for c in cs for p in c.prompts]
    assert len(prompts) == len(set(prompts))            # paraphrases never collide across concepts
    probe = E.make_images(4, 12, seed=99)                # a probe the dedup never saw
    outs = {np.round(c.apply(probe).numpy() * 64).astype(np.int16).tobytes() for c in cs}
    assert len(outs) >= 0.97 * len(cs)                   # concepts are distinct maps
    for c in cs[::37]:
        for i, p in enumerate(c.prompts):
            assert E.concept_from_prompt(p) == (c, i)
            assert E.concept_from_prompt(p.upper() + "  ")[0] is c
    assert E.concept_from_prompt("flip_h__sepia")[0].ops == ("flip_h", "sepia")
    with pytest.raises(E.EditorError, match="vocabulary"):
        E.concept_from_prompt("paint it like van gogh")
    a, b = E.make_images(5, 16, seed=1), E.make_images(5, 16, seed=1)
    assert torch.equal(a, b) and 0 <= a.min() and a.max() <= 1 and a.std() > 0.15
    assert not torch.equal(a, E.make_images(5, 16, seed=2))


def _tiny_ip2p(path: Path) -> None:
    """A tiny randomly initialised InstructPix2Pix pipeline (CLIP BPE tokenizer with no merges)."""
    from diffusers import (AutoencoderKL, EulerAncestralDiscreteScheduler, StableDiffusionInstructPix2PixPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    tokdir = path.parent / "tok"
    tokdir.mkdir()
    (tokdir / "vocab.json").write_text(json.dumps(vocab))
    (tokdir / "merges.txt").write_text("#version: 0.2\n")
    torch.manual_seed(0)
    tok = CLIPTokenizer(str(tokdir / "vocab.json"), str(tokdir / "merges.txt"), model_max_length=16)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                                        eos_token_id=vocab["<|endoftext|>"], bos_token_id=vocab["<|startoftext|>"]))
    unet = UNet2DConditionModel(sample_size=8, in_channels=8, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=2, norm_num_groups=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=16)
    StableDiffusionInstructPix2PixPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                           scheduler=EulerAncestralDiscreteScheduler(), safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False).save_pretrained(path)


@pytest.mark.slow
def test_diffusers_editor_builds_a_concept_zoo(tmp_path):
    """The cluster path: pairs made by an InstructPix2Pix pipeline loaded by path (tiny, random),
    cached in the zoo, and a LoRA member trained on them."""
    pipe = tmp_path / "ip2p"
    _tiny_ip2p(pipe)
    ed = E.make_editor(f"diffusers:{pipe}", {"num_inference_steps": 2})
    assert ed.kind == "StableDiffusionInstructPix2PixPipeline" and ed.options["image_guidance_scale"] == 1.5
    x = E.make_images(3, 16, seed=0)
    y = ed.edit(x, "make it look like a watercolor", seed=1)
    assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1
    assert torch.equal(y, ed.edit(x, "make it look like a watercolor", seed=1))     # seeded
    out = tmp_path / "zoo"
    s = load_config(ZooSpec, CONCEPTS, _tiny_concepts(out) + [
        "concepts.num_images=12", "hparams.epochs=[2,2]", "keep_last=1", f"concepts.editor=diffusers:{pipe}", "concepts.editor_options={num_inference_steps: 2}",
        'tasks=["make it look like a watercolor"]', "held_out=[]", "held_out_every=0"])
    res = build_zoo(s, use_ray=False, progress=False)
    assert res.done == 1 and res.failed == 0, res.failures
    assert len(list((out / "pairs").iterdir())) == 1
    from rayweights.table import open_zoo

    zoo = open_zoo(str(out))
    assert zoo.conditions() == ["make it look like a watercolor"]
    with pytest.raises(ConfigError, match="concepts.editor"):
        load_config(ZooSpec, CONCEPTS, ["concepts.editor=photoshop"])
    s2 = load_config(ZooSpec, CONCEPTS, [f"output={tmp_path / 'z2'}", f"concepts.editor=diffusers:{tmp_path}"])
    from rayweights.zoo.builder import prepare
    with pytest.raises(ValueError, match="concepts.editor"):
        prepare(s2)


# ----------------------------------------------------------------------------- data
def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _digits_images(n_per_class=12, classes=3):
    from sklearn.datasets import load_digits

    d = load_digits()
    out = []
    for c in range(classes):
        for img in d.images[d.target == c][:n_per_class]:
            out.append((np.kron(img / 16 * 255, np.ones((2, 2))).astype(np.uint8), c))
    return out


def test_imagefolder_parquet_and_refused_datasets(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    items = _digits_images()
    for i, (arr, c) in enumerate(items):
        (tmp_path / "folder" / f"class{c}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "folder" / f"class{c}" / f"{i:03d}.png").write_bytes(_png(arr))
    X, y = D.load_dataset(f"imagefolder:{tmp_path / 'folder'}", 16)
    assert X.shape == (36, 3, 16, 16) and sorted(set(y.tolist())) == [0, 1, 2]
    assert -0.5 <= X.min() and X.max() <= 0.5
    # a Parquet image table, HF style ({bytes, path} struct) and plain binary
    struct = pa.array([{"bytes": _png(a), "path": None} for a, _ in items])
    pq.write_table(pa.table({"image": struct, "label": [c for _, c in items]}), tmp_path / "hf.parquet")
    pq.write_table(pa.table({"image": pa.array([_png(a) for a, _ in items], pa.binary()),
                             "label": [c for _, c in items]}), tmp_path / "plain.parquet")
    Xh, yh = D.load_dataset(f"parquet:{tmp_path / 'hf.parquet'}", 16)
    Xp, yp = D.load_dataset(f"parquet:{tmp_path / 'plain.parquet'}", 16)
    assert torch.equal(Xh, Xp) and torch.equal(yh, y) and torch.allclose(Xh, X, atol=1e-6)
    task = F.task_from_condition("plain:0,2")
    (xtr, ytr), (xva, yva) = D.task_split(f"parquet:{tmp_path / 'plain.parquet'}", task, 0.25, image_size=16,
                                          max_per_class=5)
    assert len(ytr) + len(yva) == 10 and set(ytr.tolist()) | set(yva.tolist()) == {0, 1}
    with pytest.raises(ValueError, match="pickle"):
        D.check_dataset(f"torchvision:CIFAR10:{tmp_path}")
    with pytest.raises(ValueError, match="does not exist"):
        D.check_dataset(f"imagefolder:{tmp_path / 'nope'}")
    with pytest.raises(ValueError, match="does not exist"):
        D.check_dataset(f"parquet:{tmp_path / 'nope.parquet'}")
    with pytest.raises(ValueError, match="not found"):
        D.load_dataset(f"torchvision:MNIST:{tmp_path}")          # the real loader, download=False
    with pytest.raises(ValueError, match="unknown"):
        D.check_dataset("mnist-from-the-internet")
    # a subsets zoo on the image folder: tasks enumerate its classes
    spec = load_config(ZooSpec, TINY, [f"output={tmp_path / 'z'}", f"dataset=imagefolder:{tmp_path / 'folder'}",
                                       "image_size=16", "classes_per_task=2", "held_out=[]", "architecture=convnet3",
                                       "arch_options={width: 4}"])
    train, held = plan_tasks(spec)
    assert [t.condition for t in train] == ["folder:0,1", "folder:0,2", "folder:1,2"] and not held


def test_clip_features_zoo(tmp_path):
    """D2NWG-style: heads trained on frozen CLIP image features (a tiny random CLIP, loaded by path);
    the features are computed once and cached in the zoo."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=16,
        patch_size=4, projection_dim=24)).save_pretrained(tmp_path / "clip")
    out = tmp_path / "zoo"
    s = load_config(ZooSpec, TINY, [f"output={out}", "max_tasks=1", "members_per_task=2", "hparams.epochs=[6,6]",
                                    f"features=clip:{tmp_path / 'clip'}"])
    res = build_zoo(s, use_ray=False, progress=False)
    assert res.done == 2 and res.score_mean > 0.4          # chance: 0.2
    from rayweights.table import open_zoo

    zoo = open_zoo(str(out))
    assert zoo.layout.params[0].shape == (16, 24)          # mlp3 first layer on 24-d features
    (cache,) = (out / "features").iterdir()
    Fx, y = D.load_features(str(out), s.dataset, s.features, s.image_size)
    assert Fx.shape == (1797, 24) and abs(float(Fx.mean())) < 1e-3
    with pytest.raises(ValueError, match="features"):
        D.check_features(f"clip:{tmp_path}")


# ----------------------------------------------------------------------------- specs and planning
def test_spec_validation_names_the_field(tmp_path):
    def bad(field, *overrides, path=TINY):
        with pytest.raises(ConfigError, match=field):
            load_config(ZooSpec, path, list(overrides))

    bad("family", "family=weird")
    bad("architecture", "architecture=vit9000")
    bad("architecture", "family=concepts")                    # mlp3 is not an image-to-image generator
    bad("architecture", "architecture=e2gan_lora")            # ... nor the reverse
    bad("unknown key", "colour=blue")
    bad("unknown key", "concepts.colour=blue", path=CONCEPTS)
    bad("concepts.image_size", "concepts.image_size=10", path=CONCEPTS)
    bad("resources.num_gpus", "resources.num_gpus=-1")
    bad("hparams.lr", "hparams.lr=[0.1, 0.01]")
    bad("keep_last", "keep_last=9")
    bad("fail_members", "fail_members=[a:b:c]")
    bad("optimizer", "optimizer=lion")
    bad("device", "device=tpu")
    bad("val_fraction", "val_fraction=1.5")
    bad("init", "init=pretrained")


def test_shared_init_starts_every_member_of_every_task_from_one_initialisation():
    """``init: shared``: members of different tasks differ only by what training did (one basin);
    ``init: member``: each starts from its own draw."""
    from rayweights.zoo.families.subsets import train_classifier

    def first_layer(init, task, seed):
        spec = load_config(ZooSpec, TINY, [f"init={init}", "classes_per_task=4"])
        kept = train_classifier(spec, F.task_from_condition(task), seed, {"lr": 1e-9, "weight_decay": 0.0,
                                                                           "epochs": 1}, None)
        return next(v for k, v in kept[-1][1].items() if k.endswith("weight") and v.dim() == 2)

    shared = [first_layer("shared", t, s) for t, s in (("digits:0,1,2,3", 1), ("digits:4,5,6,7", 2))]
    own = [first_layer("member", t, s) for t, s in (("digits:0,1,2,3", 1), ("digits:4,5,6,7", 2))]
    assert torch.allclose(shared[0], shared[1], atol=1e-5)       # lr ~0: still the one initialisation
    assert not torch.allclose(own[0], own[1], atol=1e-2)


def test_hparams_drawn_per_member_deterministically():
    s = load_config(ZooSpec, TINY)
    a, b = F.draw_hparams(s.hparams, 11), F.draw_hparams(s.hparams, 11)
    assert a == b and a != F.draw_hparams(s.hparams, 12)
    draws = [F.draw_hparams(s.hparams, i) for i in range(200)]
    assert all(0.005 <= d["lr"] <= 0.02 and 6 <= d["epochs"] <= 8 for d in draws)
    assert len({d["epochs"] for d in draws}) == 3
    lrs = np.log([d["lr"] for d in draws])                     # log-uniform
    assert abs(lrs.mean() - (math.log(0.005) + math.log(0.02)) / 2) < 0.1


def test_concept_tasks_hold_out_whole_concepts():
    s = load_config(ZooSpec, CONCEPTS, ["max_tasks=0", "concepts.max_ops=2", "concepts.paraphrases=2",
                                        "held_out=[invert, 'make it black and white']", "held_out_every=10"])
    train, held = plan_tasks(s)
    assert len(train) + len(held) == 2 * len(E.all_concepts())
    tg, hg = {t.group for t in train}, {t.group for t in held}
    assert not tg & hg                                          # paraphrases never straddle the split
    assert {"invert", "grayscale"} <= hg and 60 <= len(hg) <= 80
    assert {t.condition for t in held if t.group == "invert"} == set(E.concept_by_key("invert").prompts[:2])
    assert len({t.task_id for t in train}) == len(train)
    # explicit prompts map to their concept (and paraphrase)
    s2 = load_config(ZooSpec, CONCEPTS, ['tasks=["flip horizontally", "sepia"]', "held_out=[]", "held_out_every=0"])
    (t1, t2), _ = plan_tasks(s2)
    assert (t1.task_id, t1.group, t2.task_id, t2.condition) == ("flip_h-p1", "flip_h", "sepia-p0",
                                                                "give it a sepia tone")


def test_max_tasks_holds_out_every_kth_among_the_first_tasks():
    """A zoo of the first N training concepts holds out the every-k-th concepts among them, not every
    k-th concept of the whole vocabulary."""
    s = load_config(ZooSpec, CONCEPTS, ["max_tasks=100", "concepts.max_ops=2", "concepts.paraphrases=1",
                                        "held_out=[]", "held_out_every=10"])
    train, held = plan_tasks(s)
    order = [c.key for c in E.all_concepts()]
    assert len(train) == 100 and len(held) == 11
    assert [t.group for t in held] == [order[i] for i in range(9, 111, 10)]
    assert max(order.index(t.group) for t in train) < 111
    assert not {t.group for t in train} & {t.group for t in held}


@pytest.mark.parametrize("init", ["member", "shared"])
def test_concept_members_start_from_one_lora_init_when_shared(init):
    """init: shared gives every member (any seed) the same LoRA factors at the start; member: its own."""
    s = load_config(ZooSpec, CONCEPTS, [f"init={init}", "held_out=[]"])
    train, _ = plan_tasks(s)
    recipe = F.get_family("concepts").recipe(s, train[0])
    a, b = recipe.build_model(1).state_dict(), recipe.build_model(2).state_dict()
    downs = [k for k in a if k.endswith("lora_down.weight")]
    assert downs and all(torch.equal(a[k], b[k]) == (init == "shared") for k in downs)


def _tiny_concepts(out) -> list[str]:
    return [f"output={out}", "arch_options={width: 4, res_blocks: 1, heads: 2}", "concepts.image_size=16",
            "concepts.num_images=40", "concepts.base_images=48", "base_epochs=4", "hparams.epochs=[6,6]",
            "hparams.lr=[0.005,0.01]", "keep_last=2", "batch_size=8", "concepts.discriminator={width: 8, layers: 2}"]


def test_concept_member_learns_its_edit_and_reassembles(tmp_path):
    """A concept member beats the base generator and the identity on its own edit, and base +
    its table rows reproduce its recorded validation L1 exactly."""
    from rayweights.table import open_zoo
    from rayweights.zoo.families import concepts as C

    out = tmp_path / "zoo"
    s = load_config(ZooSpec, CONCEPTS, _tiny_concepts(out) + ['tasks=["give it a red tint", "grayscale"]',
                                                              "held_out=[]", "held_out_every=0"])
    res = build_zoo(s, use_ray=False, progress=False)
    assert res.done == 2 and res.failed == 0, res.failures
    assert (out / "base" / "generator" / "diffusion_pytorch_model.safetensors").exists()
    zoo = open_zoo(str(out))
    assert all(".lora_" in n or ".norm" in n for n in zoo.layout.param_names)
    for mid in zoo.members.column("member_id").to_pylist():
        m = zoo.metrics(mid)[-1]
        # better than the untuned base generator and than leaving the image unedited
        assert m["val_l1"] < 0.85 * min(m["base_val_l1"], m["identity_val_l1"]), (mid, m)
        step, sd = zoo.state_dicts(mid)[-1]
        G = C.load_base_generator(s)
        G.load_state_dict(sd, strict=False)
        task = [t for t in plan_tasks(s)[0] if f"{t.task_id}-s0" == mid][0]
        assert F.get_family("concepts").recipe(s, task).evaluate(G)["l1"] == pytest.approx(m["val_l1"], abs=1e-6)
    # the cached base generator is reused, and a different base config in the same zoo is refused
    assert C.base_generator_state(s) is C.base_generator_state(s)
    s_other = load_config(ZooSpec, CONCEPTS, _tiny_concepts(out) + ["base_epochs=5"])
    with pytest.raises(ValueError, match="base generator"):
        C.base_generator_state(s_other, store=True)


def test_the_public_recipe_is_how_members_train():
    """A member the family trains equals the model its public recipe trains from the member's seed and
    hyper-parameters: the zoo builder and the evaluation fine-tune with one recipe."""
    s = load_config(ZooSpec, TINY, ["keep_last=1"])
    fam = F.get_family(s.family)
    task = fam.enumerate_tasks(s)[0]
    hp = {"lr": 0.01, "weight_decay": 1e-4, "epochs": 2}
    (_, member, metrics), = fam.train_member(s, task, 7, hp)
    r = fam.recipe(s, task, lr=hp["lr"], weight_decay=hp["weight_decay"])
    model = r.build_model(7)
    opt = r.make_optimizer(model)
    g = torch.Generator().manual_seed(7)
    for _ in range(hp["epochs"]):
        assert r.train_epoch(model, opt, g)["steps"] > 0
    assert all(torch.equal(member[k], v) for k, v in model.state_dict().items())
    assert r.evaluate(model)["accuracy"] == pytest.approx(metrics["val_acc"], abs=1e-6)
    # what the evaluation uses when not told: the centre of the zoo's ranges, the spec's optimiser
    d = fam.recipe(s, task)
    assert d.lr == pytest.approx(math.sqrt(s.hparams.lr[0] * s.hparams.lr[1]))
    assert (d.optimizer, d.batch_size) == (s.optimizer, s.batch_size)
    with pytest.raises(ValueError, match="optimizer"):
        fam.recipe(s, task, optimizer="lion")
