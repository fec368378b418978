import math
import os
import shutil

import pytest
import torch

from rayweights.conditioning import (BlockIndexEmbedding, ConditionCache, ConditioningError, SetTransformer,
                                     TextEncoder, TokenCondition, clip_contrastive_loss, dataset_features, default_text_encoder_path,
                                     sinusoidal_encoding)


pytestmark = pytest.mark.usefixtures("torch_one_thread")


# ----------------------------------------------------------------------------- eq. 2
def test_sinusoidal_encoding_is_eq2():
    n, d = torch.tensor([0, 3, 853]), 9
    enc = sinusoidal_encoding(n, d)
    assert enc.shape == (3, 9)
    for row, idx in zip(enc, n.tolist()):
        for i in range((d - 1) // 2 + 1):
            assert row[2 * i].item() == pytest.approx(math.sin(idx / 10000 ** (2 * i / d)), abs=1e-5)
            if 2 * i + 1 < d:
                assert row[2 * i + 1].item() == pytest.approx(math.cos(idx / 10000 ** (2 * i / d)), abs=1e-5)


def test_block_index_embedding_distinguishes_blocks():
    torch.manual_seed(0)
    emb = BlockIndexEmbedding(32, 16)
    e = emb(torch.arange(10))
    assert e.shape == (10, 16)
    assert torch.cdist(e, e).add(torch.eye(10) * 1e9).min() > 1e-4


# ----------------------------------------------------------------------------- text encoders
@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A tiny randomly initialised CLIP text model saved to disk, loaded *by path* like a hub model."""
    from transformers import CLIPTextConfig, CLIPTextModel

    d = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=16)
    CLIPTextModel(cfg).save_pretrained(d)
    src = default_text_encoder_path()   # any tokenizer files will do for a random model
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(os.path.join(src, f), d / f)
    return str(d)


def test_clip_text_encoder_by_path_mean_pooling_and_cache(tiny_clip_dir):
    enc = TextEncoder(tiny_clip_dir)
    out = enc.encode(["a watercolor painting", "a pencil sketch", "a watercolor painting"])
    assert type(enc._model).__name__ == "CLIPTextModel"
    assert enc.dim == 32 and out.shape == (3, 32)
    assert torch.equal(out[0], out[2]) and not torch.allclose(out[0], out[1])
    assert len(enc.cache) == 2
    # mean pooling over the attention mask, computed by hand
    tok = enc._tokenizer(["a pencil sketch"], return_tensors="pt")
    with torch.no_grad():
        h = enc._model(**tok).last_hidden_state[0]
    assert torch.allclose(out[1], h.mean(0), atol=1e-5)
    calls = []
    enc._encode_uncached = lambda p: calls.append(p)   # cached: the model is not called again
    enc.encode(["a pencil sketch"])
    assert calls == []


def test_default_minilm_encoder_offline():
    enc = TextEncoder()
    e = enc.encode(["digits:0,1,2", "digits:3,4,5"])
    assert e.shape == (2, 384) and torch.isfinite(e).all()
    assert not torch.allclose(e[0], e[1])


def test_minilm_encode_tokens_states_mask_pooled_and_cache():
    """The packaged MiniLM: last hidden states padded to the longest prompt with a mask of its real
    tokens (what its tokenizer makes), pooled = encode's masked mean; per prompt, padding-free."""
    enc = TextEncoder(default_text_encoder_path())
    prompts = ["a cat", "a watercolor painting of a lighthouse at dusk", "a cat"]
    out = enc.encode_tokens(prompts)
    lengths = [len(enc._tokenizer(p)["input_ids"]) for p in prompts]
    T = max(lengths)
    assert out.tokens.shape == (3, T, 384) and out.mask.shape == (3, T) and out.pooled.shape == (3, 384)
    assert out.mask.dtype == torch.bool and out.mask.sum(1).tolist() == lengths
    assert bool(out.mask[:, 0].all()) and bool((out.tokens[~out.mask] == 0).all())       # right padding, zeros
    assert torch.equal(out.tokens[0], out.tokens[2]) and not torch.allclose(out.pooled[0], out.pooled[1])
    torch.testing.assert_close(out.pooled, enc.encode(prompts), atol=1e-5, rtol=1e-5)      # MiniLM: the mean
    # a prompt's states do not depend on the prompts padded beside it
    alone = TextEncoder(default_text_encoder_path()).encode_tokens(["a cat"])
    assert alone.tokens.shape == (1, lengths[0], 384)
    torch.testing.assert_close(alone.tokens[0], out.tokens[0, :lengths[0]], atol=1e-5, rtol=1e-5)
    assert len(enc.token_cache) == 2
    enc._encode_tokens_uncached = lambda p: pytest.fail(f"re-encoded {p}")                  # cached per prompt
    assert torch.equal(enc.encode_tokens(["a cat"]).tokens[0], out.tokens[0, :lengths[0]])


@pytest.mark.parametrize("kind", ["text_with_projection", "full_clip"])
def test_clip_with_a_text_projection_pools_the_projected_eos(tmp_path, kind):
    """CLIP checkpoints with a text projection (CLIPTextModelWithProjection, or a full CLIPModel whose
    projection width is set at the top level): pooled = CLIP's text_embeds, tokens = last hidden states."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig

    torch.manual_seed(0)
    text = dict(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77)
    if kind == "full_clip":
        vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=32, patch_size=16)
        CLIPModel(CLIPConfig(text_config=CLIPTextConfig(**text).to_dict(), vision_config=vision.to_dict(),
                             projection_dim=24)).save_pretrained(tmp_path)
    else:
        CLIPTextModelWithProjection(CLIPTextConfig(**text, projection_dim=24)).save_pretrained(tmp_path)
    src = default_text_encoder_path()
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(os.path.join(src, f), tmp_path / f)
    enc = TextEncoder(str(tmp_path))
    prompts = ["a pencil sketch", "an oil painting of the sea"]
    out = enc.encode_tokens(prompts)
    assert type(enc._model).__name__ == "CLIPTextModelWithProjection"
    assert enc.dim == 32 and enc.pooled_dim == 24 and out.pooled.shape == (2, 24)
    tok = enc._tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = enc._model(**tok)
    torch.testing.assert_close(out.pooled, ref.text_embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.tokens[out.mask], ref.last_hidden_state[tok["attention_mask"].bool()],
                               atol=1e-5, rtol=1e-5)
    assert enc.encode(prompts).shape == (2, 32)          # encode stays the hidden states' masked mean


def test_text_encoder_bad_path_names_it(tmp_path):
    with pytest.raises(ConditioningError, match="no-such-model"):
        TextEncoder(str(tmp_path / "no-such-model")).encode(["x"])


def test_condition_cache_roundtrip(tmp_path):
    c = ConditionCache(["a", "b"], torch.randn(2, 5), "text", "enc")
    c.save(str(tmp_path / "c.safetensors"))
    d = ConditionCache.load(str(tmp_path / "c.safetensors"))
    assert d.conditions == ["a", "b"] and d.kind == "text" and d.encoder == "enc"
    assert torch.equal(d.lookup(["b", "a"]), c.embeddings[[1, 0]])
    d.extend(["c", "a"], torch.ones(2, 5))
    assert d.conditions == ["a", "b", "c"] and torch.equal(d.lookup(["c"])[0], torch.ones(5))
    with pytest.raises(ConditioningError, match="'zzz' is not in the cache"):
        d.ids(["zzz"])
    with pytest.raises(ConditioningError, match="does not match"):
        ConditionCache(["a"], torch.zeros(2, 3), "text")


def _token_rows(lengths, dim=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randn(n, dim, generator=g) for n in lengths]
    return TokenCondition.from_rows(rows, torch.randn(len(lengths), 5, generator=g)), rows


def test_condition_cache_round_trip_with_token_states(tmp_path):
    tc, rows = _token_rows([3, 5])
    c = ConditionCache.from_tokens(["a", "b"], tc, "text", "enc")
    assert c.has_tokens and c.tokens.shape == (2, 5, 6) and c.token_dim == 6 and c.dim == 5
    c.save(str(tmp_path / "c.safetensors"))
    d = ConditionCache.load(str(tmp_path / "c.safetensors"))
    assert d.has_tokens and torch.equal(d.tokens, c.tokens) and torch.equal(d.token_mask, c.token_mask)
    got = d.lookup_tokens(["b", "a"])
    assert torch.equal(got.tokens[0], rows[1]) and torch.equal(got.tokens[1, :3], rows[0])
    assert got.mask.sum(1).tolist() == [5, 3] and torch.equal(got.pooled, c.embeddings[[1, 0]])
    # a longer new prompt pads every row to the cache's new max length; a known one is not re-added
    more, more_rows = _token_rows([7, 2], seed=1)
    d.extend(["c", "a"], more.pooled, more)
    assert d.conditions == ["a", "b", "c"] and d.tokens.shape == (3, 7, 6)
    assert torch.equal(d.lookup_tokens(["c"]).tokens[0], more_rows[0])
    assert torch.equal(d.lookup_tokens(["a"]).tokens[0, :3], rows[0]) and d.token_mask.sum(1).tolist() == [3, 5, 7]
    with pytest.raises(ConditioningError, match="new conditions need them"):
        d.extend(["e"], torch.zeros(1, 5))
    # a pooled-only cache (written before token states existed) still loads, pooled only
    old = ConditionCache.from_bytes(ConditionCache(["a"], torch.ones(1, 5), "text", "enc").to_bytes())
    assert not old.has_tokens and torch.equal(old.lookup(["a"]), torch.ones(1, 5))
    with pytest.raises(ConditioningError, match="no token states"):
        old.lookup_tokens(["a"])
    with pytest.raises(ConditioningError, match="go together"):
        ConditionCache(["a"], torch.ones(1, 5), "text", tokens=torch.ones(1, 2, 3))
    with pytest.raises(ConditioningError, match="'a' has no token"):
        ConditionCache(["a"], torch.ones(1, 5), "text", tokens=torch.ones(1, 2, 3),
                       token_mask=torch.zeros(1, 2, dtype=torch.bool))


def test_token_condition_null_rows():
    tc, _ = _token_rows([2, 4])
    n = tc.null_rows(torch.tensor([False, True]))
    assert torch.equal(n[0].tokens, tc[0].tokens) and torch.equal(n[0].mask, tc[0].mask)
    assert bool((n.tokens[1] == 0).all()) and n.mask[1].tolist() == [True, False, False, False]
    assert bool((n.pooled[1] == 0).all()) and torch.equal(n.pooled[0], tc.pooled[0])
    single = tc[1].null()                                   # an unbatched row keeps its shape
    assert single.tokens.shape == (4, 6) and single.mask.tolist() == [True, False, False, False]


# ----------------------------------------------------------------------------- datasets
def test_dataset_features_digits_and_files(tmp_path):
    f = dataset_features("digits:0,1,2", samples_per_class=7, seed=3)
    assert f.shape == (3, 7, 64)
    assert torch.equal(f, dataset_features("digits:0,1,2", 7, 3))
    assert not torch.equal(f, dataset_features("digits:0,1,2", 7, 4))
    from safetensors.torch import save_file

    save_file({"features": torch.randn(4, 12, 10)}, str(tmp_path / "f.safetensors"))
    assert dataset_features(f"features:{tmp_path / 'f.safetensors'}", 5).shape == (4, 5, 10)
    with pytest.raises(ConditioningError, match="no dataset named 'cifar'"):
        dataset_features("cifar:0,1")
    with pytest.raises(ConditioningError, match="classes 0-9"):
        dataset_features("digits:0,12")


def test_set_transformer_is_permutation_invariant():
    torch.manual_seed(0)
    st = SetTransformer(in_dim=64, hidden_dim=32, out_dim=16, num_heads=2, num_inds=4).eval()
    x = dataset_features("digits:1,4,7", 6)
    with torch.no_grad():
        a = st(x)
        b = st(x[[2, 0, 1]][:, torch.randperm(6)])      # shuffle classes and samples within classes
    assert a.shape == (1, 16)
    assert torch.allclose(a, b, atol=1e-5)


def test_contrastive_loss_prefers_true_pairs_and_handles_shared_datasets():
    torch.manual_seed(0)
    zd = torch.randn(3, 8)
    ids = torch.tensor([0, 0, 1, 2])
    zw = zd[ids] + 0.01 * torch.randn(4, 8)
    scale = torch.tensor(math.log(10.0))
    good = clip_contrastive_loss(zw, zd, ids, scale)
    bad = clip_contrastive_loss(zw, zd, torch.tensor([1, 2, 0, 0]), scale)
    assert good < bad


def test_set_transformer_contrastive_pretraining_aligns_datasets_with_weights():
    """D2NWG eq. 2: after pretraining, each dataset embedding retrieves its own weight latents."""
    torch.manual_seed(0)
    conds = ["digits:0,1,2", "digits:3,4,5", "digits:6,7,8", "digits:0,5,9", "digits:2,4,8"]
    feats = torch.stack([dataset_features(c, 8) for c in conds])
    latents = torch.randn(len(conds), 2, 4, 8)            # two weight latents per dataset, [zc, zl] = [4, 8]
    st = SetTransformer(in_dim=64, hidden_dim=32, out_dim=16, num_heads=2, num_inds=4, weight_dim=32)
    opt = torch.optim.AdamW(st.parameters(), lr=3e-3)
    ids = torch.arange(len(conds)).repeat_interleave(2)
    for _ in range(120):
        loss = clip_contrastive_loss(st.embed_weights(latents.view(-1, 4, 8)), st(feats), ids, st.logit_scale)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        sim = torch.nn.functional.normalize(st(feats), dim=-1) @ \
            torch.nn.functional.normalize(st.embed_weights(latents.view(-1, 4, 8)), dim=-1).t()
    assert (sim.argmax(0) == ids).all(), sim
    assert loss.item() < 0.5


def test_dataset_conditions_resolve_through_the_zoo_family_for_any_dataset(tmp_path):
    """A zoo on an image folder (images made here): its conditions describe D2NWG datasets through
    the family's data API (the members' training split), not a digits-only loader."""
    from PIL import Image

    from rayweights.generators import build_method
    from rayweights.config import to_dict
    from rayweights.zoo import ZooSpec
    from rayweights.zoo.families import condition_features, template_state_dict
    from rayweights.blocks import WeightLayout

    g = torch.Generator().manual_seed(0)
    for c in range(3):
        os.makedirs(tmp_path / "shapes" / f"c{c}")
        for i in range(8):
            img = (torch.rand(8, 8, 3, generator=g) * 80 + 60 * c).clamp(0, 255).to(torch.uint8).numpy()
            Image.fromarray(img).save(tmp_path / "shapes" / f"c{c}" / f"{i}.png")
    spec = ZooSpec(name="shapes", family="dataset-subsets", dataset=f"imagefolder:{tmp_path / 'shapes'}",
                   image_size=8, classes_per_task=2, architecture="mlp3", arch_options={"hidden": 4})
    f = condition_features(spec, "shapes:0,2", samples_per_class=4, seed=1)
    assert f.shape == (2, 4, 3 * 8 * 8)
    assert float(f[1].mean()) > float(f[0].mean())              # class 2 images are brighter
    assert torch.equal(dataset_features("shapes:0,2", 4, 1, zoo_spec=to_dict(spec)), f)
    with pytest.raises(ConditioningError, match="shapes:0,7"):
        dataset_features("shapes:0,7", 4, 1, zoo_spec=spec)
    sd = template_state_dict(spec)
    layout = WeightLayout.from_state_dict(sd, block_size=32)
    layout = layout.fit_stats(layout.tokenize(sd)[None])
    m = build_method("d2nwg", layout, "tiny", condition_names=["shapes:0,1", "shapes:1,2"],
                     dataset_options={"samples_per_class": 4, "zoo_spec": to_dict(spec)})
    assert m.build_features_bank().shape == (2, 2, 4, 192)
    assert m.model_configs["dataset_encoder"]["in_dim"] == 192
