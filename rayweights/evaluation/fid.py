"""FID and KID through clean-fid with a configurable feature extractor, plus image folders for them.

Feature extractor specs (``build_feature_extractor``):

* ``"inception:<dir>"`` — clean-fid's Inception-V3 (``inception-2015-12-05.pt``) loaded from a local
  folder, as on a cluster whose nodes carry the file (nothing is downloaded): the only spec that gives
  Inception FID/KID, comparable with published numbers;
* ``"trained:<path>"`` — the offline metric: a :class:`TrainedFeatureExtractor` folder (local path or
  ``s3://``) holding a small CNN trained to classify which single editing operation of
  :mod:`rayweights.zoo.editor` (colour, tone, filter, geometry) made an image.  Its scores are "FID with
  a trained edit-op CNN", not Inception FID: comparable between runs that load the same folder.
  :func:`ensure_trained_extractor` trains and saves one once (beside a zoo) and loads it afterwards;
  :func:`zoo_extractor_spec` gives the one of a zoo (``<zoo>/extractor/``, what the ``concepts``
  evaluation's bare ``"trained"`` means);
* ``"small"`` / ``"small:<dim>"`` — a small *randomly initialised* (fixed seed) conv net: its distances
  measure pixel statistics seen through random filters, comparable only with other ``small`` scores of
  the same dim (a smoke-test metric, not FID);
* ``"module:<pkg.module>:<factory>"`` — any ``nn.Module`` factory taking no argument, mapping
  float images ``[B, 3, H, W]`` in [0, 255] to features ``[B, D]``.

:func:`compute_fid` and :func:`compute_kid` score two folders; :func:`image_metrics` gives both with the
image counts and the extractor, which every reported score should carry.  Images in folders are RGB
PNGs; :func:`save_images` writes them from tensors.  :func:`image_features` gives the same features for
in-memory images without the folder (clean-fid's preprocessing of the saved PNGs, done in memory), and
:func:`feature_metrics` FID/KID from two feature arrays: reference features are computed once and reused.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn
from ..errors import UserError

__all__ = ["SmallFeatureExtractor", "TrainedFeatureExtractor", "ExtractorReport", "train_feature_extractor",
           "edit_op_training_set", "ensure_trained_extractor", "build_feature_extractor", "save_images",
           "compute_fid", "compute_kid", "image_metrics", "image_features", "feature_metrics", "extractor_label",
           "zoo_extractor_spec", "EXTRACTOR_DIR", "FIDError"]

INCEPTION_FILE = "inception-2015-12-05.pt"


class FIDError(UserError, ValueError):
    """A feature extractor spec or an image folder is unusable (names it)."""


class SmallFeatureExtractor(nn.Module):
    """Conv features for offline FID: 4 stride-2 convs (ReLU between), global average pool.

    Deterministic for a given ``seed``; expects [B, 3, H, W] in [0, 255] (any H, W >= 16)."""

    def __init__(self, dim: int = 64, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        chans = [3, 16, 32, 64, dim]
        layers = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            conv = nn.Conv2d(cin, cout, 3, stride=2, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * (2.0 / (cin * 9)) ** 0.5)
                conv.bias.zero_()
            layers += [conv, nn.ReLU()]
        self.net = nn.Sequential(*layers[:-1])      # no ReLU on the features: no dead (constant) feature
        self.dim = dim
        self.eval()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 127.5 - 1.0
        return self.net(x).mean(dim=(2, 3))


class TrainedFeatureExtractor(ModelMixin, ConfigMixin):
    """Edit-operation CNN for offline FID/KID: 4 conv + BatchNorm + ReLU stages (two of stride 2), a
    ``pool`` x ``pool`` average pool (keeps where things are: flips and rotations), a ``dim``-wide
    feature layer and a classification head used only in training.

    ``forward`` maps float images ``[B, 3, H, W]`` in [0, 255] (clean-fid's convention; resized to
    ``image_size`` when H, W differ) to the features ``[B, dim]``; :meth:`classify` gives the logits.
    BatchNorm, not GroupNorm: a per-image normalisation would erase the brightness and contrast edits."""

    @register_to_config
    def __init__(self, dim: int = 64, num_classes: int = 48, image_size: int = 16, width: int = 32, pool: int = 2,
                 class_names: tuple = ()):
        super().__init__()
        if class_names and len(class_names) != num_classes:
            raise FIDError(f"class_names: {len(class_names)} names for num_classes={num_classes}")
        chans, strides = [3, width, 2 * width, 2 * width, 4 * width], [1, 2, 1, 2]
        layers = []
        for cin, cout, st in zip(chans[:-1], chans[1:], strides):
            layers += [nn.Conv2d(cin, cout, 3, stride=st, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(pool), nn.Flatten())
        self.features = nn.Linear(4 * width * pool * pool, dim)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(dim, num_classes))

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise FIDError(f"images: expected [B, 3, H, W] in [0, 255], got shape {tuple(x.shape)}")
        size = self.config.image_size
        x = x.to(self.features.weight.dtype) / 127.5 - 1.0
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return self.features(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._embed(x)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self._embed(x))


@dataclass(frozen=True)
class ExtractorReport:
    """How a :class:`TrainedFeatureExtractor` was trained and how well it classifies held-out images."""

    accuracy: float          # held-out classification accuracy
    chance: float            # 1 / num_classes
    num_classes: int
    n_train: int
    n_holdout: int
    steps: int
    seconds: float
    seed: int


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Shift by up to one pixel (edge padding) plus faint noise: changes no operation's signature."""
    B, _, H, W = x.shape
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    dy, dx = torch.randint(0, 3, (2,), generator=g).tolist()
    x = padded[:, :, dy:dy + H, dx:dx + W]
    return (x + 0.01 * torch.randn(x.shape, generator=g)).clamp(0, 1)


def train_feature_extractor(images: torch.Tensor, labels: torch.Tensor, num_classes: int, *, dim: int = 64,
                            steps: int = 800, batch_size: int = 64, lr: float = 3e-3, holdout: float = 0.2,
                            seed: int = 0, class_names: tuple[str, ...] = (),
                            progress: Callable[[int, float], None] | None = None
                            ) -> tuple[TrainedFeatureExtractor, ExtractorReport]:
    """Train a :class:`TrainedFeatureExtractor` as a classifier (AdamW, cosine learning rate, one-pixel
    shifts and faint noise) on ``images`` (float ``[N, 3, H, W]`` in [0, 1], H == W) with integer
    ``labels``; a ``holdout`` fraction (a seeded random split) is kept out and scored.
    Deterministic for a seed on one device.  ``progress(step, loss)`` is called every 100 steps."""
    if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
        raise FIDError(f"images: expected float [N, 3, S, S] in [0, 1], got shape {tuple(images.shape)}")
    if labels.shape != (len(images),):
        raise FIDError(f"labels: expected shape ({len(images)},), got {tuple(labels.shape)}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise FIDError(f"labels: values must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    if not 0 < holdout < 1:
        raise FIDError(f"holdout: expected a fraction in (0, 1), got {holdout}")
    start = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(images), generator=g)
    n_val = max(1, int(round(len(images) * holdout)))
    val, tr = perm[:n_val], perm[n_val:]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TrainedFeatureExtractor(dim=dim, num_classes=num_classes, image_size=images.shape[-1],
                                        class_names=tuple(class_names))
    images, labels = images.float(), labels.long()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps)))
    model.train()
    for step in range(steps):
        idx = tr[torch.randint(len(tr), (batch_size,), generator=g)]
        loss = F.cross_entropy(model.classify(_augment(images[idx], g) * 255.0), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress is not None and (step + 1) % 100 == 0:
            progress(step + 1, float(loss))
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model.classify(images[val[i:i + 256]] * 255.0).argmax(1) for i in range(0, n_val, 256)])
    acc = float((pred == labels[val]).float().mean())
    return model, ExtractorReport(accuracy=acc, chance=1.0 / num_classes, num_classes=num_classes,
                                  n_train=len(tr), n_holdout=n_val, steps=steps,
                                  seconds=time.perf_counter() - start, seed=seed)


def edit_op_training_set(n_per_op: int, image_size: int = 16, seed: int = 0
                         ) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """(images ``[N, 3, S, S]`` in [0, 1], labels ``[N]``, class names): ``n_per_op`` procedural source
    images (fresh ones per class) unedited (class ``identity``) and edited by each single-operation
    concept of :func:`rayweights.zoo.editor.all_concepts` (label = the operation)."""
    from ..zoo.editor import all_concepts, make_images    # the zoo's editor: only where a training set is made

    if n_per_op < 1:
        raise FIDError(f"n_per_op: expected >= 1, got {n_per_op}")
    singles = [c for c in all_concepts() if len(c.ops) == 1]
    names = ("identity",) + tuple(c.key for c in singles)
    src = make_images(n_per_op * len(names), image_size, seed=seed).view(len(names), n_per_op, 3, image_size,
                                                                         image_size)
    edited = [src[0]] + [c.apply(src[i + 1]) for i, c in enumerate(singles)]
    labels = torch.arange(len(names)).repeat_interleave(n_per_op)
    return torch.cat(edited).contiguous(), labels, names


REPORT_FILE = "training.json"


def _load_trained(path: str) -> TrainedFeatureExtractor:
    from ..generators.io import local_copy    # local path or s3:// (the generators' model-folder helper)

    try:
        with local_copy(path) as d:
            cfg = os.path.join(d, "config.json")
            if not os.path.isfile(cfg):
                raise FIDError(f"feature_extractor: trained:{path} is not a model folder (no config.json)")
            with open(cfg) as f:
                name = json.load(f).get("_class_name")
            if name != TrainedFeatureExtractor.__name__:
                raise FIDError(f"feature_extractor: trained:{path} holds a {name or 'unknown'} model, "
                               f"not a {TrainedFeatureExtractor.__name__}")
            return TrainedFeatureExtractor.from_pretrained(d, low_cpu_mem_usage=False).eval()
    except FileNotFoundError:
        raise FIDError(f"feature_extractor: trained:{path}: no such folder") from None


def ensure_trained_extractor(path: str, image_size: int = 16, seed: int = 0, *, n_per_op: int = 40,
                             steps: int = 800, dim: int = 64) -> TrainedFeatureExtractor:
    """The extractor saved at the local folder ``path``; trained on :func:`edit_op_training_set` and saved
    there first when the folder does not exist (into a temporary sibling renamed into place, so a reader
    never sees a half-written folder; when another writer wins the race, its folder is loaded).
    The training report is kept beside the weights as ``training.json``."""
    if "://" in path:
        raise FIDError(f"ensure_trained_extractor: {path}: trains into a local folder only (upload it after)")
    if os.path.exists(path):
        return _load_trained(path)
    images, labels, names = edit_op_training_set(n_per_op, image_size, seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # one thread: the same weights in every process (a driver, a Tune trial, a
    try:                            # Ray task), so FIDs of extractors made apart compare
        model, report = train_feature_extractor(images, labels, len(names), dim=dim, steps=steps, seed=seed,
                                                class_names=names)
    finally:
        torch.set_num_threads(threads)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(path))}.tmp-{uuid.uuid4().hex}")
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        with open(os.path.join(tmp, REPORT_FILE), "w") as f:
            json.dump({**asdict(report), "class_names": list(names), "n_per_op": n_per_op}, f, indent=1)
        try:
            os.rename(tmp, path)
        except OSError:
            if not os.path.isdir(path):
                raise
            return _load_trained(path)             # another process saved it first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model.eval()


class _Inception(nn.Module):
    def __init__(self, folder: str):
        super().__init__()
        path = os.path.join(folder, INCEPTION_FILE)
        if not os.path.isfile(path):
            raise FIDError(f"feature_extractor: {path} not found (put clean-fid's {INCEPTION_FILE} there)")
        from cleanfid.inception_torchscript import InceptionV3W   # clean-fid: only for the Inception extractor

        self.model = InceptionV3W(folder, download=False, resize_inside=False).eval()

    @torch.no_grad()
    def forward(self, x):
        return self.model(x)


def _pil_resizer(size: int) -> Callable:
    """clean-fid's PIL bicubic float resize to ``size`` x ``size``; tagged ``identity_at = (size, size)``:
    PIL returns an unchanged copy when the size does not change, so images of that size pass as they are
    (:func:`image_features` skips the per-image call then; same numbers)."""
    from cleanfid.resize import make_resizer   # clean-fid: imported where a score is computed

    resize = make_resizer("PIL", False, "bicubic", (size, size))
    resize.identity_at = (size, size)
    return resize


def build_feature_extractor(spec: str, device: torch.device | str = "cpu") -> tuple[nn.Module, Callable | None]:
    """(module, custom resize fn or None) for a spec (see the module doc)."""
    if not isinstance(spec, str) or not spec:
        raise FIDError(f"feature_extractor: expected a spec string, got {spec!r}")
    kind, _, arg = spec.partition(":")
    resize = None
    if kind == "small":
        try:
            dim = int(arg) if arg else 64
        except ValueError:
            raise FIDError(f"feature_extractor: {spec!r}: 'small:<dim>' needs an integer dim") from None
        model = SmallFeatureExtractor(dim)
        resize = _pil_resizer(64)
    elif kind == "trained":
        if not arg:
            raise FIDError("feature_extractor: 'trained:<path>' needs the folder of a TrainedFeatureExtractor")
        model = _load_trained(arg)
        resize = _pil_resizer(model.config.image_size)
    elif kind == "inception":
        if not arg:
            raise FIDError("feature_extractor: 'inception:<dir>' needs the folder holding " + INCEPTION_FILE)
        model = _Inception(arg)
    elif kind == "module":
        mod, _, fn = arg.rpartition(":")
        if not mod or not fn:
            raise FIDError(f"feature_extractor: {spec!r}: expected module:<pkg.module>:<factory>")
        try:
            model = getattr(importlib.import_module(mod), fn)()
        except (ImportError, AttributeError) as exc:
            raise FIDError(f"feature_extractor: cannot import {arg}: {exc}") from exc
    else:
        raise FIDError(f"feature_extractor: unknown kind {kind!r} "
                       "(small[:dim], trained:<path>, inception:<dir>, module:<mod>:<fn>)")
    return model.to(device).eval(), resize


def _to_uint8(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """uint8 ``[N, H, W, 3]`` from the inputs :func:`save_images` accepts (the pixels it writes)."""
    x = images.detach().cpu().numpy() if torch.is_tensor(images) else np.asarray(images)
    if x.ndim != 4:
        raise FIDError(f"images: expected 4 dims [N, C, H, W] or [N, H, W, C], got shape {x.shape}")
    if x.shape[1] in (1, 3) and x.shape[-1] not in (1, 3):
        x = x.transpose(0, 2, 3, 1)
    if x.dtype != np.uint8:
        x = x.astype(np.float64)
        x = (x + 1.0) / 2.0 if x.min() < 0 else x
        x = np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return x


def save_images(images: torch.Tensor | np.ndarray, folder: str, prefix: str = "img") -> list[str]:
    """Write a batch of images as PNGs. Accepts uint8 [N, H, W, 3] / [N, 3, H, W] or float in [-1, 1]
    ([N, 3, H, W], the usual generator output) or [0, 1] (when ``images.min() >= 0``)."""
    from PIL import Image          # only where images are written

    x = _to_uint8(images)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, img in enumerate(x):
        p = os.path.join(folder, f"{prefix}-{i:05d}.png")
        Image.fromarray(img).save(p)
        paths.append(p)
    return paths


def _check_folders(*dirs: str) -> None:
    for d in dirs:
        if not os.path.isdir(d) or not any(f.lower().endswith((".png", ".jpg", ".jpeg")) for f in os.listdir(d)):
            raise FIDError(f"FID: {d} is not a folder of images")


def _extractor(feature_extractor: str | nn.Module | tuple, device: torch.device) -> tuple[nn.Module, Callable | None]:
    if isinstance(feature_extractor, str):
        return build_feature_extractor(feature_extractor, device)
    if isinstance(feature_extractor, tuple):
        model, resize = feature_extractor
        return model.to(device).eval(), resize
    return feature_extractor.to(device).eval(), None


def _folder_features(folder: str, model: nn.Module, resize: Callable | None, device: torch.device,
                     batch_size: int) -> np.ndarray:
    from cleanfid import fid       # clean-fid: imported where a score is computed

    return fid.get_folder_features(folder, model, num_workers=0, batch_size=batch_size, device=device,
                                   custom_fn_resize=resize, verbose=False)


def _kid(feats_a: np.ndarray, feats_b: np.ndarray, seed: int) -> float:
    """clean-fid's ``kernel_distance`` (the KID of its ``compute_kid``) with its subset draws seeded.
    With equal counts of at most 1000 every one of its 100 subsets holds all the images (a permutation,
    and the estimator is permutation invariant), so one subset gives the same value at 1/100 the cost."""
    from cleanfid import fid

    state = np.random.get_state()
    np.random.seed(seed)
    try:
        if len(feats_a) == len(feats_b) <= 1000:
            return float(fid.kernel_distance(feats_a, feats_b, num_subsets=1))
        return float(fid.kernel_distance(feats_a, feats_b))
    finally:
        np.random.set_state(state)


def compute_fid(dir_a: str, dir_b: str, feature_extractor: str | nn.Module | tuple = "small",
                device: torch.device | str = "cpu", batch_size: int = 32) -> float:
    """Clean-FID between two image folders with the given extractor: a spec string, a module (clean-fid's
    299x299 resize), or the ``(module, resize fn)`` pair :func:`build_feature_extractor` returns."""
    from cleanfid import fid       # clean-fid: imported where a score is computed

    _check_folders(dir_a, dir_b)
    device = torch.device(device)
    model, resize = _extractor(feature_extractor, device)
    return float(fid.compute_fid(dir_a, dir_b, custom_feat_extractor=model, device=device, num_workers=0,
                                 batch_size=batch_size, custom_fn_resize=resize, verbose=False,
                                 use_dataparallel=False))


def compute_kid(dir_a: str, dir_b: str, feature_extractor: str | nn.Module | tuple = "small",
                device: torch.device | str = "cpu", batch_size: int = 32, seed: int = 0) -> float:
    """Clean-KID between two image folders, extractor as in :func:`compute_fid`.  clean-fid's
    ``compute_kid`` takes no custom extractor, so its two steps run here: ``get_folder_features`` and
    ``kernel_distance`` (100 subsets of min(n_a, n_b, 1000) images, drawn with ``seed``)."""
    _check_folders(dir_a, dir_b)
    device = torch.device(device)
    model, resize = _extractor(feature_extractor, device)
    fa, fb = (_folder_features(d, model, resize, device, batch_size) for d in (dir_a, dir_b))
    return _kid(fa, fb, seed)


def image_features(images: torch.Tensor | np.ndarray, feature_extractor: str | nn.Module | tuple = "small",
                   device: torch.device | str = "cpu", batch_size: int = 256) -> np.ndarray:
    """Extractor features ``[N, D]`` of in-memory images (any input of :func:`save_images`): the features
    clean-fid's ``get_folder_features`` gives for the folder :func:`save_images` would write — the same
    uint8 pixels, the same resize function (clean-fid's ``"clean"`` resize when the extractor has none),
    the same tensor conversion and ``get_batch_features`` — without writing or reading PNGs."""
    from cleanfid import fid       # clean-fid: imported where a score is computed
    from cleanfid.resize import build_resizer
    from torchvision.transforms import ToTensor

    x = _to_uint8(images)
    device = torch.device(device)
    model, resize = _extractor(feature_extractor, device)
    resize = resize or build_resizer("clean")
    to_tensor = ToTensor()
    same_size = getattr(resize, "identity_at", None) == tuple(x.shape[1:3])
    feats = []
    for i in range(0, len(x), batch_size):
        if same_size:                       # the resize would return the float pixels unchanged
            batch = torch.from_numpy(x[i:i + batch_size].astype(np.float32)).permute(0, 3, 1, 2)
        else:
            batch = []
            for img in x[i:i + batch_size]:
                r = resize(img)             # as clean-fid's ResizeDataset.__getitem__
                batch.append(to_tensor(np.array(r)) * 255 if r.dtype == np.uint8 else to_tensor(r))
            batch = torch.stack(batch)
        feats.append(fid.get_batch_features(batch, model, device))
    return np.concatenate(feats)


def feature_metrics(feats_a: np.ndarray, feats_b: np.ndarray, seed: int = 0) -> dict:
    """``{"fid", "kid", "n_a", "n_b"}`` from two feature arrays: clean-fid's ``frechet_distance`` of the
    fitted Gaussians and its ``kernel_distance`` (subsets drawn with ``seed``)."""
    from cleanfid import fid

    if len(feats_a) < 2 or len(feats_b) < 2:
        raise FIDError(f"FID: needs at least 2 images a side, got {len(feats_a)} and {len(feats_b)}")
    fd = fid.frechet_distance(feats_a.mean(0), np.cov(feats_a, rowvar=False), feats_b.mean(0),
                              np.cov(feats_b, rowvar=False))
    return {"fid": float(fd), "kid": _kid(feats_a, feats_b, seed), "n_a": len(feats_a), "n_b": len(feats_b)}


def extractor_label(spec: str) -> str:
    """What a score made with the extractor ``spec`` is, for reports: ``small`` is a random network
    (not FID), ``trained:`` an edit-operation CNN (not Inception FID), ``inception:`` Inception FID."""
    kind = spec.partition(":")[0] if isinstance(spec, str) else ""
    return {"small": f"{spec} (random network, not FID: comparable only with the same small extractor)",
            "trained": f"{spec} (edit-operation CNN trained on the procedural images; not Inception FID: "
                       "comparable only with scores of the same extractor folder)",
            "inception": f"{spec} (clean-fid Inception-V3: FID)"}.get(kind, f"{spec} (custom extractor)")


EXTRACTOR_DIR = "extractor"


def _cache_root() -> str:
    return os.path.expanduser(os.environ.get("RAYWEIGHTS_CACHE") or "~/.cache/rayweights")


def zoo_extractor_spec(zoo_uri: str, image_size: int) -> str:
    """``"trained:<zoo>/extractor"``: the zoo's trained extractor, made on first use.

    A local zoo keeps it in ``<zoo>/extractor/`` (:func:`ensure_trained_extractor` at the zoo's
    ``image_size``: trained once, atomically, then loaded).  An ``s3://`` zoo: when
    ``<zoo>/extractor/config.json`` exists it is used; otherwise the extractor is trained into the
    local cache ``$RAYWEIGHTS_CACHE/extractors/<hash of the zoo URI>-s<size>/`` (default
    ``~/.cache/rayweights``) and uploaded to ``<zoo>/extractor/`` file by file, ``config.json`` last (what
    readers check), so later readers on any node load the one copy.  A zoo re-tokenised from another
    (``retokenized_from`` in its ``zoo_spec.json``) uses the source zoo's extractor: its FIDs compare with
    the source's and with every other re-tokenisation's (a block-size or grouping-rule sweep)."""
    from ..storage import StorageError, exists, read_bytes, resolve, write_bytes_atomic

    try:
        try:                        # a re-tokenised zoo (same members, same images) uses its source's extractor
            src = json.loads(read_bytes(resolve(zoo_uri).join("zoo_spec.json"))).get("retokenized_from")
        except (FileNotFoundError, ValueError):
            src = None
        if src and src != zoo_uri and exists(resolve(src).join("zoo_spec.json")):
            return zoo_extractor_spec(src, image_size)
        loc = resolve(zoo_uri).join(EXTRACTOR_DIR)
        if not loc.is_s3:
            ensure_trained_extractor(loc.path, image_size)
            return f"trained:{loc.uri}"
        if exists(loc.join("config.json")):
            return f"trained:{loc.uri}"
        key = hashlib.sha1(loc.uri.encode()).hexdigest()[:16]
        local = os.path.join(_cache_root(), "extractors", f"{key}-s{image_size}")
        ensure_trained_extractor(local, image_size)
        names = sorted(os.listdir(local), key=lambda n: n == "config.json")
        for name in names:
            with open(os.path.join(local, name), "rb") as f:
                write_bytes_atomic(loc.join(name), f.read())
        return f"trained:{loc.uri}"
    except (StorageError, OSError) as exc:
        raise FIDError(f"feature_extractor: trained (the zoo's extractor under {zoo_uri}): {exc}") from exc


def image_metrics(dir_a: str, dir_b: str, feature_extractor: str | nn.Module | tuple = "small",
                  device: torch.device | str = "cpu", batch_size: int = 32, seed: int = 0) -> dict:
    """``{"fid", "kid", "n_a", "n_b", "extractor"}`` for two image folders (features extracted once; the
    same numbers as :func:`compute_fid` / :func:`compute_kid`): every score carries its image counts and
    its extractor (the spec string, else the module's class name)."""
    _check_folders(dir_a, dir_b)
    device = torch.device(device)
    model, resize = _extractor(feature_extractor, device)
    fa, fb = (_folder_features(d, model, resize, device, batch_size) for d in (dir_a, dir_b))
    name = feature_extractor if isinstance(feature_extractor, str) else type(model).__name__
    return {**feature_metrics(fa, fb, seed), "extractor": name}
