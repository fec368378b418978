"""The concepts family's source images (``concepts.sources``: image folders, Parquet image tables,
local and S3) and its base generator's objective (``concepts.base_objective``: the training
concepts' edit mixture, or identity for zoos built before it existed)."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from rayweights.config import ConfigError, load_config, to_dict
from rayweights.zoo import ZooSpec, plan_tasks
from rayweights.zoo import sources as S
from rayweights.zoo.families import concepts as C
from rayweights.zoo.families import get_family
from rayweights.zoo.spec import read_zoo_spec

pytestmark = pytest.mark.usefixtures("torch_one_thread")

ROOT = Path(__file__).resolve().parents[1]
CONCEPTS = ROOT / "jobs" / "specs" / "concepts.yaml"


def _png(rgb, size=(20, 20), mode="RGB", fmt="PNG") -> bytes:
    im = Image.new("RGB", size, tuple(int(v) for v in rgb)).convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def _images(n: int, seed: int = 0) -> list[bytes]:
    """``n`` encoded images of different sizes, modes and formats (PNG RGB / RGBA / L, JPEG)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        arr = rng.integers(0, 256, size=(12 + 3 * (i % 4), 16 + 2 * (i % 3), 3), dtype=np.uint8)
        jpeg = i % 5 == 4
        im = Image.fromarray(arr).convert("RGB" if jpeg else ("RGB", "RGBA", "L", "RGB")[i % 4])
        buf = io.BytesIO()
        im.save(buf, format="JPEG" if jpeg else "PNG")
        out.append(buf.getvalue())
    return out


def _names(n: int) -> list[str]:
    return [f"img{i:03d}.{'jpg' if i % 5 == 4 else 'png'}" for i in range(n)]


def _folder(root: Path, blobs: list[bytes]) -> Path:
    for i, (name, b) in enumerate(zip(_names(len(blobs)), blobs)):
        d = root / ("a" if i % 2 else "b")          # sub-folders: the order is by path, not by folder
        d.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(b)
    return root


def _load(sources, num_images=8, size=16, seed=0, column="image"):
    S.load_sources.cache_clear()
    return S.load_sources(sources, column, num_images, size, seed)


def _spec(*overrides) -> ZooSpec:
    return load_config(ZooSpec, CONCEPTS, ["arch_options={width: 4, res_blocks: 1, heads: 2}",
                                           "concepts.discriminator={width: 8, layers: 2}", "batch_size=8",
                                           *overrides])


# ----------------------------------------------------------------------------- sources
def test_folder_source_reads_crops_and_picks_deterministically(tmp_path):
    blobs = _images(12)
    # one wide image whose outer thirds are red / blue: the centre crop keeps only its green middle
    wide = np.zeros((20, 80, 3), np.uint8)
    wide[:, :25] = (255, 0, 0)
    wide[:, 25:55] = (0, 255, 0)
    wide[:, 55:] = (0, 0, 255)
    buf = io.BytesIO()
    Image.fromarray(wide).save(buf, format="PNG")
    _folder(tmp_path / "imgs", blobs)
    (tmp_path / "imgs" / "zz_wide.png").write_bytes(buf.getvalue())
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    src = _load(f"imagefolder:{tmp_path / 'imgs'}", num_images=13)
    assert src.images.shape == (13, 3, 16, 16) and src.images.dtype == torch.float32
    assert 0 <= float(src.images.min()) and float(src.images.max()) <= 1
    assert src.identity["found"] == 13 and src.identity["uri"] == str(tmp_path / "imgs")
    green = [im for im in src.images if float(im[1].min()) > 0.99 and float(im[0].max()) < 0.01]
    assert len(green) == 1 and float(green[0][2].max()) < 0.01          # no red, no blue: centre-cropped
    # a bare folder URI is the same source; the pick is by seed (same seed: same images, in order)
    a = _load(str(tmp_path / "imgs"), num_images=6)
    b = _load(f"imagefolder:{tmp_path / 'imgs'}", num_images=6)
    c = _load(str(tmp_path / "imgs"), num_images=6, seed=1)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    # every picked image is one of the folder's
    full = {im.numpy().tobytes() for im in src.images}
    assert all(im.numpy().tobytes() in full for im in c.images)


def test_parquet_source_equals_the_folder_of_the_same_images(tmp_path):
    blobs = _images(10, seed=3)
    _folder(tmp_path / "imgs", blobs)
    order = sorted(range(10), key=lambda i: f"{'a' if i % 2 else 'b'}/{_names(10)[i]}")   # the folder's path order
    rows = [blobs[i] for i in order]
    pq.write_table(pa.table({"img": pa.array(rows, pa.binary()), "label": list(range(10))}), tmp_path / "t.parquet")
    hf = pa.array([{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(rows)],
                  pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    (tmp_path / "hf").mkdir()
    pq.write_table(pa.table({"image": hf}), tmp_path / "hf" / "part-0.parquet")
    folder = _load(str(tmp_path / "imgs"), num_images=7)
    table = _load(f"parquet:{tmp_path / 't.parquet'}", num_images=7, column="img")
    bare = _load(str(tmp_path / "t.parquet"), num_images=7, column="img")
    struct = _load(f"parquet:{tmp_path / 'hf'}", num_images=7)
    assert torch.equal(folder.images, table.images) and torch.equal(table.images, bare.images)
    assert torch.equal(table.images, struct.images)
    assert table.identity["column"] == "img" and table.identity["sha256"] == folder.identity["sha256"]
    # a concepts spec on the table: its tasks edit these images
    spec = _spec(f"concepts.sources=parquet:{tmp_path / 't.parquet'}", "concepts.sources_column=img",
                 "concepts.num_images=10", "max_tasks=2", "output=")
    get_family("concepts").check(spec)
    task = plan_tasks(spec)[0][0]
    (xtr, ytr), (xva, _) = C.task_pairs(spec, task)
    src = _load(f"parquet:{tmp_path / 't.parquet'}", num_images=10, column="img").images
    assert len(xtr) + len(xva) == 10 and all(any(torch.equal(x, s) for s in src) for x in xtr)


@pytest.mark.s3
def test_s3_folder_source(tmp_path, s3_uri):
    import boto3

    blobs = _images(9, seed=5)
    _folder(tmp_path / "imgs", blobs)
    bucket, prefix = s3_uri[5:].split("/", 1)
    s3 = boto3.client("s3")
    for p in sorted((tmp_path / "imgs").rglob("*")):
        if p.is_file():
            s3.put_object(Bucket=bucket, Key=f"{prefix}/imgs/{p.relative_to(tmp_path / 'imgs')}", Body=p.read_bytes())
    remote = f"{s3_uri}/imgs"
    S.check_sources(remote, "image", 9)
    got = _load(remote, num_images=9)
    assert torch.equal(got.images, _load(str(tmp_path / "imgs"), num_images=9).images)
    assert got.identity["uri"] == remote and got.identity["found"] == 9
    with pytest.raises(S.SourceError, match=r"concepts\.sources: .*fewer than concepts\.num_images = 10"):
        S.check_sources(remote, "image", 10)
    with pytest.raises(S.SourceError, match=rf"concepts\.sources: no .* images under {s3_uri}/nothing"):
        S.check_sources(f"{s3_uri}/nothing", "image", 4)


def test_bad_sources_are_one_error_naming_the_field_and_path(tmp_path):
    fam = get_family("concepts")

    def bad(match, *overrides):
        with pytest.raises(ValueError, match=match):
            fam.check(_spec("output=", *overrides))

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    bad(rf"concepts\.sources: no .*images under {tmp_path / 'empty'}", f"concepts.sources={tmp_path / 'empty'}")
    bad(rf"concepts\.sources: no .*images under {tmp_path / 'nope'}", f"concepts.sources={tmp_path / 'nope'}")
    _folder(tmp_path / "few", _images(5))
    bad(rf"concepts\.sources: {tmp_path / 'few'} holds 5 images, fewer than concepts\.num_images = 64",
        f"concepts.sources={tmp_path / 'few'}")
    pq.write_table(pa.table({"picture": pa.array(_images(4), pa.binary())}), tmp_path / "t.parquet")
    bad(r"concepts\.sources: Parquet image table .*t\.parquet has no column 'image' \(columns: picture",
        f"concepts.sources={tmp_path / 't.parquet'}")
    pq.write_table(pa.table({"image": list(range(4))}), tmp_path / "ints.parquet")
    bad(r"concepts\.sources: column 'image' of .*ints\.parquet is int64, not encoded image bytes",
        f"concepts.sources=parquet:{tmp_path / 'ints.parquet'}")
    bad(r"concepts\.sources: .*t\.parquet holds 4 rows, fewer than concepts\.num_images = 8",
        f"concepts.sources={tmp_path / 't.parquet'}", "concepts.sources_column=picture", "concepts.num_images=8")
    bad(r"concepts\.sources: cannot read Parquet image table .*missing\.parquet",
        f"concepts.sources={tmp_path / 'missing.parquet'}")
    # an undecodable file is found when the images are read
    _folder(tmp_path / "broken", _images(4))
    (tmp_path / "broken" / "b" / "zz.png").write_bytes(b"not a png")
    with pytest.raises(S.SourceError, match=r"concepts\.sources: .*zz\.png is not a readable image"):
        _load(str(tmp_path / "broken"), num_images=5)
    # the form is checked when the spec loads
    for value in ("ftp://host/images", "parquet:", ""):
        with pytest.raises(ConfigError, match="concepts.sources"):
            _spec(f"concepts.sources='{value}'")


def test_a_changed_source_is_not_reused(tmp_path):
    """The source's identity is part of the base generator's training config: a cached base trained
    on other images is refused, not silently loaded."""
    _folder(tmp_path / "imgs", _images(8))
    spec = _spec(f"concepts.sources={tmp_path / 'imgs'}", "concepts.num_images=8", "base_epochs=1",
                 "max_tasks=2", f"output={tmp_path / 'zoo'}")
    S.load_sources.cache_clear()
    C.base_generator_state(spec, store=True)
    cfg = json.loads((tmp_path / "zoo" / "base" / "generator" / "config.json").read_text())["training"]
    assert cfg["sources"]["uri"] == str(tmp_path / "imgs") and cfg["sources"]["found"] == 8
    first = sorted((tmp_path / "imgs").rglob("*.png"))[0]
    first.write_bytes(_images(1, seed=99)[0])                   # same names and count, other pixels
    S.load_sources.cache_clear()
    assert C._base_config(spec)["sources"]["sha256"] != cfg["sources"]["sha256"]
    with pytest.raises(ValueError, match="base generator trained with another configuration"):
        C.base_generator_state(spec, store=True)


# ----------------------------------------------------------------------------- the base generator
def test_mixture_base_learns_only_training_concepts_and_beats_identity_on_them(tmp_path):
    held = ["invert", "grayscale"]
    # training concepts an unconditioned map can share (all darken), and two held-out ones
    tasks = ["make it darker", "crush the shadows", "make it black and white", "reduce the contrast",
             "invert the colours", "give it a sepia tone"]
    common = [f"tasks={json.dumps(tasks)}", f"held_out={json.dumps(held)}", "held_out_every=0",
              "concepts.base_images=96", "base_epochs=30", "concepts.num_images=40"]
    mix = _spec(f"output={tmp_path / 'mix'}", *common)
    ident = _spec(f"output={tmp_path / 'id'}", "concepts.base_objective=identity", *common)
    assert mix.concepts.base_objective == "mixture"             # the default
    train, held_tasks = plan_tasks(mix)
    C.base_generator_state(mix, store=True)
    C.base_generator_state(ident, store=True)
    cfg = json.loads((tmp_path / "mix" / "base" / "generator" / "config.json").read_text())["training"]
    assert cfg["objective"] == "mixture" and cfg["concepts"] == ["bright_down", "gamma_high", "contrast_down", "sepia"]
    assert not set(cfg["concepts"]) & {t.group for t in held_tasks} and {t.group for t in held_tasks} == set(held)
    # an identity base keeps the training config zoos had before sources and objectives existed
    old_keys = {"architecture", "arch_options", "image_size", "base_images", "base_lr", "base_epochs", "batch_size",
                "image_seed"}
    assert set(json.loads((tmp_path / "id" / "base" / "generator" / "config.json").read_text())["training"]) == old_keys

    def l1_on_training_concepts(spec):
        G = C.load_base_generator(spec)
        return np.mean([C._l1(G, *[v * 2 - 1 for v in C.task_pairs(spec, t)[1]]) for t in train])

    l_mix, l_id = l1_on_training_concepts(mix), l1_on_training_concepts(ident)
    print(f"base L1 on the training concepts' validation pairs: mixture {l_mix:.4f}, identity {l_id:.4f}")
    assert l_mix < 0.95 * l_id, (l_mix, l_id)           # measured: 0.1646 vs 0.1767


def test_old_zoo_specs_read_as_identity_base(tmp_path):
    """A zoo_spec.json written before ``concepts.base_objective`` existed reads with identity semantics
    (its cached base generator was trained on identity); new ones keep what they say."""
    spec = _spec(f"output={tmp_path}")
    d = to_dict(spec)
    d["concepts"] = {k: v for k, v in d["concepts"].items()
                     if k not in ("base_objective", "sources", "sources_column")}
    (tmp_path / "zoo_spec.json").write_text(json.dumps({"spec": d, "held_out": []}))
    old, _ = read_zoo_spec(str(tmp_path))
    assert old.concepts.base_objective == "identity" and old.concepts.sources == "procedural"
    (tmp_path / "zoo_spec.json").write_text(json.dumps({"spec": to_dict(spec), "held_out": []}))
    assert read_zoo_spec(str(tmp_path))[0].concepts.base_objective == "mixture"
    # resuming an identity zoo with a mixture spec: refused, with the fix in the message
    C.base_generator_state(dataclasses.replace(old, base_epochs=1), store=True)
    with pytest.raises(ValueError, match="set concepts.base_objective: identity to resume"):
        C.base_generator_state(dataclasses.replace(spec, base_epochs=1), store=True)
