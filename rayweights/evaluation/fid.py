"""FID through clean-fid with a configurable feature extractor, plus image folders for it.

Feature extractor specs (``build_feature_extractor``):

* ``"inception:<dir>"`` — clean-fid's Inception-V3 (``inception-2015-12-05.pt``) loaded from a local
  folder, as on a cluster whose nodes carry the file (nothing is downloaded);
* ``"small"`` / ``"small:<dim>"`` — a small randomly initialised (fixed seed) conv feature extractor,
  the offline default: FIDs are comparable between runs with the same spec, not with Inception FIDs;
* ``"module:<pkg.module>:<factory>"`` — any ``nn.Module`` factory taking no argument, mapping
  float images ``[B, 3, H, W]`` in [0, 255] to features ``[B, D]``.

Images in folders are RGB PNGs; :func:`save_images` writes them from tensors.
"""

from __future__ import annotations

import importlib
import os
from typing import Callable

import numpy as np
import torch
from torch import nn
from ..errors import UserError

__all__ = ["SmallFeatureExtractor", "build_feature_extractor", "save_images", "compute_fid", "FIDError"]

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
        from cleanfid.resize import make_resizer   # clean-fid: imported where a score is computed

        resize = make_resizer("PIL", False, "bicubic", (64, 64))
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
        raise FIDError(f"feature_extractor: unknown kind {kind!r} (small[:dim], inception:<dir>, module:<mod>:<fn>)")
    return model.to(device).eval(), resize


def save_images(images: torch.Tensor | np.ndarray, folder: str, prefix: str = "img") -> list[str]:
    """Write a batch of images as PNGs. Accepts uint8 [N, H, W, 3] / [N, 3, H, W] or float in [-1, 1]
    ([N, 3, H, W], the usual generator output) or [0, 1] (when ``images.min() >= 0``)."""
    from PIL import Image          # only where images are written

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
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, img in enumerate(x):
        p = os.path.join(folder, f"{prefix}-{i:05d}.png")
        Image.fromarray(img).save(p)
        paths.append(p)
    return paths


def compute_fid(dir_a: str, dir_b: str, feature_extractor: str | nn.Module | tuple = "small",
                device: torch.device | str = "cpu", batch_size: int = 32) -> float:
    """Clean-FID between two image folders with the given extractor: a spec string, a module (clean-fid's
    299x299 resize), or the ``(module, resize fn)`` pair :func:`build_feature_extractor` returns."""
    from cleanfid import fid       # clean-fid: imported where a score is computed

    for d in (dir_a, dir_b):
        if not os.path.isdir(d) or not any(f.lower().endswith((".png", ".jpg", ".jpeg")) for f in os.listdir(d)):
            raise FIDError(f"FID: {d} is not a folder of images")
    device = torch.device(device)
    if isinstance(feature_extractor, str):
        model, resize = build_feature_extractor(feature_extractor, device)
    elif isinstance(feature_extractor, tuple):
        model, resize = feature_extractor
        model = model.to(device).eval()
    else:
        model, resize = feature_extractor.to(device).eval(), None
    return float(fid.compute_fid(dir_a, dir_b, custom_feat_extractor=model, device=device, num_workers=0,
                                 batch_size=batch_size, custom_fn_resize=resize, verbose=False,
                                 use_dataparallel=False))
