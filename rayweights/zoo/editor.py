"""Paired image data for the ``concepts`` family: source images, concepts, prompts and editors.

Denoised Neural Weights builds its zoo from (source, edited) image pairs per text concept, the
edited images made by diffusion editors (InstructPix2Pix, SD img2img, ...).  Here:

* **Source images** are made in code (:func:`make_images`): gradients, shapes, stripes and checks
  in random colours, deterministic in a seed; ``concepts.sources`` reads the user's image folder or
  Parquet image table instead (:mod:`rayweights.zoo.sources`).
* **Concepts** are real image operations (:data:`OPS`): colour shifts (hue rotations, tints,
  warm/cool, brightness, contrast, saturation, gamma, channel swaps), tone operations (invert,
  grayscale, sepia, posterize, solarize, threshold), filters (blur, sharpen, edges, emboss,
  pixelate) and geometry (flips, rotations, transpose), plus two-step compositions across
  categories.  Compositions whose result equals an earlier concept's on a probe set are dropped,
  so every concept is a distinct image-to-image map (about 700 of them).
* **Prompts**: each operation has several phrasings; a concept's prompts combine them with a few
  templates, so one concept can appear under paraphrased prompts (the paper's augmented concepts).
* **Editors**: :class:`ProceduralEditor` applies a concept's operations exactly;
  :class:`DiffusersEditor` loads an InstructPix2Pix or SD img2img pipeline *by path* and edits the
  source images with the prompt (paper A.1 settings by default).

Images are float32 tensors ``[N, 3, H, W]`` in ``[0, 1]``.

One module (~420 lines): the operations, the concept vocabulary built from them and the two editors
share the concept key format and change together.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from ..errors import UserError

__all__ = ["OPS", "Concept", "all_concepts", "concept_by_key", "concept_from_prompt", "make_images",
           "ProceduralEditor", "DiffusersEditor", "make_editor", "EditorError"]


class EditorError(UserError, ValueError):
    """An editor cannot be built or used (names the spec field or path)."""


# --------------------------------------------------------------------------- operations
def _rgb_to_hsv(x):
    r, g, b = x.unbind(1)
    mx, _ = x.max(1)
    mn, _ = x.min(1)
    d = mx - mn
    h = torch.zeros_like(mx)
    nz = d > 1e-8
    rc = torch.where(nz & (mx == r), ((g - b) / d.clamp_min(1e-8)) % 6, torch.zeros_like(d))
    gc = torch.where(nz & (mx == g) & (mx != r), (b - r) / d.clamp_min(1e-8) + 2, torch.zeros_like(d))
    bc = torch.where(nz & (mx == b) & (mx != r) & (mx != g), (r - g) / d.clamp_min(1e-8) + 4, torch.zeros_like(d))
    h = (rc + gc + bc) / 6.0
    s = torch.where(mx > 1e-8, d / mx.clamp_min(1e-8), torch.zeros_like(mx))
    return torch.stack([h % 1.0, s, mx], 1)


def _hsv_to_rgb(x):
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6) % 6
    f = h * 6 - torch.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = torch.zeros_like(x)
    for k, (r, g, b) in enumerate(choices):
        m = (i == k).unsqueeze(1)
        out = torch.where(m, torch.stack([r, g, b], 1), out)
    return out


def _luma(x):
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _conv(x, k):
    k = torch.as_tensor(k, dtype=x.dtype)
    k = k.expand(x.shape[1], 1, *k.shape)
    pad = k.shape[-1] // 2
    return F.conv2d(F.pad(x, (pad,) * 4, mode="replicate"), k, groups=x.shape[1])


def _gauss(sigma):
    r = max(1, int(math.ceil(2 * sigma)))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    g = torch.exp(-t ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def hue(deg):
    def f(x):
        hsv = _rgb_to_hsv(x)
        hsv[:, 0] = (hsv[:, 0] + deg / 360.0) % 1.0
        return _hsv_to_rgb(hsv)
    return f


def tint(rgb, amount=0.5):
    c = torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1)
    return lambda x: (1 - amount) * x + amount * _luma(x) * c * 1.6


def scale_channels(r, g, b):
    s = torch.tensor([r, g, b], dtype=torch.float32).view(1, 3, 1, 1)
    return lambda x: x * s


def saturation(k):
    return lambda x: _luma(x) + k * (x - _luma(x))


def contrast(k):
    return lambda x: 0.5 + k * (x - 0.5)


def sepia(x):
    m = torch.tensor([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]])
    return torch.einsum("oc,nchw->nohw", m, x)


def posterize(levels):
    return lambda x: torch.round(x * (levels - 1)) / (levels - 1)


def edges(x):
    gx = _conv(_luma(x), [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]])
    gy = _conv(_luma(x), [[-1, -2, -1], [0, 0, 0], [1, 2, 1]])
    return (gx ** 2 + gy ** 2).sqrt().div(2).expand(-1, 3, -1, -1)


def emboss(x):
    return (_conv(_luma(x), [[-2, -1, 0], [-1, 1, 1], [0, 1, 2]]) * 0.5 + 0.25).expand(-1, 3, -1, -1)


def pixelate(k):
    def f(x):
        H, W = x.shape[-2:]
        return F.interpolate(F.avg_pool2d(x, k, ceil_mode=True), size=(H, W), mode="nearest")
    return f


# (category, key) -> (function, phrasings). Colour ops last in a composition, geometry first.
OPS: dict[str, tuple[str, Callable, tuple[str, ...]]] = {}


def _op(key, category, fn, *phrases):
    OPS[key] = (category, fn, phrases)


_COLOURS = {"red": (1.0, 0.25, 0.2), "green": (0.25, 1.0, 0.3), "blue": (0.2, 0.35, 1.0), "yellow": (1.0, 0.9, 0.2),
            "cyan": (0.2, 0.95, 1.0), "magenta": (1.0, 0.2, 0.9), "orange": (1.0, 0.55, 0.1),
            "purple": (0.6, 0.2, 1.0), "teal": (0.1, 0.7, 0.6), "pink": (1.0, 0.5, 0.7)}
for _name, _rgb in _COLOURS.items():
    _op(f"tint_{_name}", "colour", tint(_rgb), f"give it a {_name} tint", f"make everything look {_name}",
        f"wash the picture in {_name}", f"{_name} colour filter")
for _deg, _words in ((60, "a little"), (120, "a third of the way"), (180, "halfway"), (-60, "back a little")):
    _op(f"hue_{_deg:+d}".replace("+", "p").replace("-", "m"), "colour", hue(_deg),
        f"rotate the hue {_words} around the colour wheel", f"shift all hues by {_deg} degrees",
        f"hue shift of {_deg} degrees")
_op("warm", "colour", scale_channels(1.15, 1.0, 0.75), "make it warmer", "warm colour grading", "golden hour look")
_op("cool", "colour", scale_channels(0.8, 0.95, 1.2), "make it cooler", "cold blue colour grading", "icy look")
_op("bright_up", "colour", lambda x: x * 1.35 + 0.05, "make it brighter", "increase the brightness", "lighten it up")
_op("bright_down", "colour", lambda x: x * 0.6, "make it darker", "decrease the brightness", "dim the image")
_op("contrast_up", "colour", contrast(1.6), "increase the contrast", "make it punchy and high contrast",
    "boost the contrast")
_op("contrast_down", "colour", contrast(0.5), "reduce the contrast", "make it flat and washed out", "low contrast look")
_op("saturate", "colour", saturation(1.8), "make the colours more vivid", "increase saturation", "oversaturate it")
_op("desaturate", "colour", saturation(0.35), "mute the colours", "reduce saturation", "faded colours")
_op("gamma_low", "colour", lambda x: x.clamp(0, 1) ** 0.5, "lift the shadows", "apply gamma 0.5",
    "brighten the dark parts")
_op("gamma_high", "colour", lambda x: x.clamp(0, 1) ** 2.0, "crush the shadows", "apply gamma 2",
    "darken the mid-tones")
for _perm, _name in (((2, 1, 0), "bgr"), ((1, 2, 0), "gbr"), ((2, 0, 1), "brg")):
    _op(f"swap_{_name}", "colour", (lambda p: lambda x: x[:, list(p)])(_perm),
        f"swap the colour channels to {_name.upper()}", f"reorder channels as {_name}", f"{_name} channel swap")
_op("invert", "tone", lambda x: 1 - x, "invert the colours", "make it a photo negative", "negative image",
    "swap light and dark")
_op("grayscale", "tone", lambda x: _luma(x).expand(-1, 3, -1, -1), "make it black and white",
    "convert to grayscale", "remove all colour", "monochrome version")
_op("sepia", "tone", sepia, "give it a sepia tone", "make it look like an old photograph", "vintage brown tint")
for _lv in (2, 3, 4):
    _op(f"posterize_{_lv}", "tone", posterize(_lv), f"posterize to {_lv} levels", f"reduce to {_lv} tones per channel",
        f"flat poster look with {_lv} levels")
_op("solarize", "tone", lambda x: torch.where(x > 0.5, 1 - x, x), "solarize it", "solarisation effect",
    "invert the highlights")
_op("threshold", "tone", lambda x: (_luma(x) > 0.45).float().expand(-1, 3, -1, -1), "pure black and white threshold",
    "binarize the image", "two-tone stencil")
_op("blur_1", "filter", lambda x: _conv(x, _gauss(0.8)), "slightly blur the image", "soft focus",
    "make it a little blurry")
_op("blur_2", "filter", lambda x: _conv(x, _gauss(1.6)), "heavily blur the image", "make it very blurry",
    "throw it out of focus")
_op("sharpen", "filter", lambda x: _conv(x, [[0, -1, 0], [-1, 5, -1], [0, -1, 0]]), "sharpen the image",
    "make the details crisper", "enhance fine detail")
_op("edges", "filter", edges, "draw only the edges", "edge detection", "turn it into a line sketch")
_op("emboss", "filter", emboss, "emboss the image", "make it look embossed in metal", "relief effect")
_op("pixelate_2", "filter", pixelate(2), "pixelate it a little", "make it look low resolution", "8-bit look")
_op("pixelate_4", "filter", pixelate(4), "pixelate it heavily", "giant pixels", "mosaic effect")
_op("flip_h", "geometry", lambda x: x.flip(-1), "mirror it left to right", "flip horizontally",
    "reflect across the vertical axis")
_op("flip_v", "geometry", lambda x: x.flip(-2), "flip it upside down", "flip vertically",
    "reflect across the horizontal axis")
_op("rot_90", "geometry", lambda x: x.rot90(1, (-2, -1)), "rotate a quarter turn counter-clockwise",
    "rotate 90 degrees left", "turn it 90 degrees anticlockwise")
_op("rot_180", "geometry", lambda x: x.rot90(2, (-2, -1)), "rotate it half a turn", "turn it 180 degrees",
    "rotate by 180 degrees")
_op("rot_270", "geometry", lambda x: x.rot90(3, (-2, -1)), "rotate a quarter turn clockwise",
    "rotate 90 degrees right", "turn it 90 degrees clockwise")
_op("transpose", "geometry", lambda x: x.transpose(-2, -1), "transpose the image", "swap rows and columns",
    "mirror across the diagonal")

_ORDER = {"geometry": 0, "filter": 1, "tone": 2, "colour": 3}
_TEMPLATES = ("{a}, then {b}", "{a} and {b}", "first {a}, then {b}")


@dataclass(frozen=True)
class Concept:
    key: str                      # "flip_h__grayscale": operations joined by "__", applied in order
    ops: tuple[str, ...]
    prompts: tuple[str, ...]      # prompts[0] is the canonical one

    @property
    def categories(self) -> tuple[str, ...]:
        return tuple(OPS[o][0] for o in self.ops)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        for o in self.ops:
            x = OPS[o][1](x)
        return x.clamp(0, 1)


def _prompts(ops: tuple[str, ...]) -> tuple[str, ...]:
    if len(ops) == 1:
        return OPS[ops[0]][2]
    a, b = OPS[ops[0]][2], OPS[ops[1]][2]
    out = []
    for i in range(max(len(a), len(b))):       # vary both phrasings and templates
        out.append(_TEMPLATES[i % len(_TEMPLATES)].format(a=a[i % len(a)], b=b[(i + 1) % len(b)]))
    return tuple(out)


@lru_cache(maxsize=1)
def all_concepts() -> tuple[Concept, ...]:
    """Every distinct concept: single operations, then two-step compositions across categories
    (geometry -> filter -> tone -> colour order), deduplicated by their effect on a probe set."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # ~1000 tiny ops: thread hand-offs would cost more than the work
    try:
        return _build_concepts()
    finally:
        torch.set_num_threads(threads)


def _build_concepts() -> tuple[Concept, ...]:
    probe = make_images(12, 16, seed=12345)
    singles = [(k,) for k in OPS]
    pairs = [(a, b) for a, b in itertools.combinations(OPS, 2) if _ORDER[OPS[a][0]] < _ORDER[OPS[b][0]]]
    pairs += [(b, a) for a, b in itertools.combinations(OPS, 2) if _ORDER[OPS[b][0]] < _ORDER[OPS[a][0]]]
    pairs.sort(key=lambda p: (_ORDER[OPS[p[0]][0]], _ORDER[OPS[p[1]][0]], list(OPS).index(p[0]),
                              list(OPS).index(p[1])))
    fp = lambda y: hashlib.sha1(np.round(y.clamp(0, 1).numpy() * 64).astype(np.int16).tobytes()).digest()
    first = {k: OPS[k][1](probe) for k in OPS}                   # each operation once on the probe set
    results: dict[tuple, torch.Tensor] = {(k,): first[k].clamp(0, 1) for k in OPS}
    n = len(probe)
    for b in OPS:                                                 # the second step batched over first steps
        firsts = [p[0] for p in pairs if p[1] == b]
        if firsts:
            out_b = OPS[b][1](torch.cat([first[a].clamp(0, 1) for a in firsts]))
            for i, a in enumerate(firsts):
                results[(a, b)] = out_b[i * n:(i + 1) * n]
    seen: set[bytes] = {fp(probe)}
    out = []
    for ops in singles + pairs:
        f = fp(results[ops])
        if f in seen:
            continue
        seen.add(f)
        out.append(Concept("__".join(ops), ops, _prompts(ops)))
    return tuple(out)


@lru_cache(maxsize=1)
def _index() -> tuple[dict, dict]:
    by_key = {c.key: c for c in all_concepts()}
    by_prompt = {}
    for c in all_concepts():
        for i, p in enumerate(c.prompts):
            by_prompt.setdefault(_norm(p), (c, i))
    return by_key, by_prompt


def _norm(p: str) -> str:
    return re.sub(r"\s+", " ", p.strip().lower())


def concept_by_key(key: str) -> Concept:
    try:
        return _index()[0][key]
    except KeyError:
        raise EditorError(f"concept {key!r}: unknown (operations joined by '__', e.g. 'flip_h__grayscale'; "
                          f"{len(all_concepts())} concepts known)") from None


def concept_from_prompt(prompt: str) -> tuple[Concept, int]:
    """-> (concept, paraphrase index) for one of the vocabulary's prompts, or a concept key."""
    hit = _index()[1].get(_norm(prompt))
    if hit is not None:
        return hit
    if _norm(prompt) in _index()[0]:
        return _index()[0][_norm(prompt)], 0
    raise EditorError(f"concept prompt {prompt!r}: not in the procedural editor's vocabulary "
                      "(use one of its prompts or a concept key such as 'grayscale' or 'flip_h__sepia')")


# --------------------------------------------------------------------------- source images
def make_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """``n`` procedural RGB scenes [n, 3, size, size] in [0, 1]: a two-colour gradient background,
    2-4 shapes (discs, boxes, triangles) in random colours, and sometimes stripes or checks."""
    g = torch.Generator().manual_seed(seed)
    u = lambda *s: torch.rand(*s, generator=g)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    imgs = torch.empty(n, 3, size, size)
    for i in range(n):
        c0, c1 = u(3, 1, 1), u(3, 1, 1)
        ang = u(1) * 2 * math.pi
        t = (xx * torch.cos(ang) + yy * torch.sin(ang)).clamp(0, 1)
        img = c0 * (1 - t) + c1 * t
        for _ in range(int(u(1) * 3) + 2):
            col = u(3, 1, 1)
            cx, cy, r = u(1), u(1), 0.12 + 0.25 * u(1)
            kind = int(u(1) * 3)
            if kind == 0:
                m = (xx - cx) ** 2 + (yy - cy) ** 2 < r ** 2
            elif kind == 1:
                m = ((xx - cx).abs() < r) & ((yy - cy).abs() < r * (0.4 + u(1)))
            else:
                m = (yy > cy - r) & ((xx - cx).abs() < (yy - cy + r) / 2)
            img = torch.where(m, col.expand_as(img), img)
        pat = u(1)
        if pat < 0.25:
            img = img * (0.8 + 0.2 * (torch.sin(xx * size * 0.8) > 0).float())
        elif pat < 0.4:
            img = img * (0.85 + 0.15 * (((xx * 4).floor() + (yy * 4).floor()) % 2))
        imgs[i] = img.clamp(0, 1)
    return imgs


# --------------------------------------------------------------------------- editors
class ProceduralEditor:
    """Applies a concept's operations exactly (the offline default)."""

    name = "procedural"

    def edit(self, images: torch.Tensor, prompt: str, seed: int = 0) -> torch.Tensor:
        concept, _ = concept_from_prompt(prompt)
        return concept.apply(images)


class DiffusersEditor:
    """Edits images with a diffusers pipeline loaded by path (no hub access at run time).

    ``kind`` is read from the pipeline's ``model_index.json``: ``StableDiffusionInstructPix2PixPipeline``
    (``image_guidance_scale``) or ``StableDiffusionImg2ImgPipeline`` (``strength``).  Defaults follow
    Denoised Neural Weights A.1: IP2P 100 steps, text guidance 7.5, image guidance 1.5; SD img2img
    strength 0.68, guidance 7.5, 50 steps.  ``options`` override them (e.g. ``num_inference_steps``).
    """

    name = "diffusers"
    DEFAULTS = {
        "StableDiffusionInstructPix2PixPipeline": {"num_inference_steps": 100, "guidance_scale": 7.5,
                                                   "image_guidance_scale": 1.5},
        "StableDiffusionImg2ImgPipeline": {"num_inference_steps": 50, "guidance_scale": 7.5, "strength": 0.68},
    }

    def __init__(self, path: str, options: dict | None = None, device: str = "cpu"):
        index = os.path.join(path, "model_index.json")
        if not os.path.isfile(index):
            raise EditorError(f"concepts.editor: {path} is not a diffusers pipeline folder (no model_index.json)")
        with open(index) as f:
            cls_name = json.load(f).get("_class_name", "")
        if cls_name not in self.DEFAULTS:
            raise EditorError(f"concepts.editor: {path} holds a {cls_name or 'unknown'} pipeline "
                              f"(supported: {', '.join(self.DEFAULTS)})")
        import diffusers   # here: a diffusers pipeline is loaded only for a concepts zoo with this editor

        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        self.pipe = getattr(diffusers, cls_name).from_pretrained(path, torch_dtype=dtype, safety_checker=None,
                                                                 requires_safety_checker=False)
        self.pipe.to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.kind = cls_name
        self.options = {**self.DEFAULTS[cls_name], **(options or {})}
        self.device = device

    @torch.no_grad()
    def edit(self, images: torch.Tensor, prompt: str, seed: int = 0, batch_size: int = 8) -> torch.Tensor:
        H, W = images.shape[-2:]
        out = []
        for i in range(0, len(images), batch_size):
            chunk = images[i:i + batch_size]
            gen = torch.Generator(device="cpu").manual_seed(seed + i)
            res = self.pipe(prompt=[prompt] * len(chunk), image=chunk, generator=gen, output_type="pt",
                            **self.options).images
            res = torch.as_tensor(res).float().cpu()
            if res.shape[-2:] != (H, W):
                res = F.interpolate(res, size=(H, W), mode="bilinear", align_corners=False)
            out.append(res.clamp(0, 1))
        return torch.cat(out)


def make_editor(spec_editor: str, options: dict | None = None, device: str = "cpu"):
    """``procedural`` | ``diffusers:<path>`` (an InstructPix2Pix / SD img2img pipeline folder)."""
    if spec_editor == "procedural":
        return ProceduralEditor()
    if spec_editor.startswith("diffusers:"):
        return DiffusersEditor(spec_editor.split(":", 1)[1], options, device)
    raise EditorError(f"concepts.editor: {spec_editor!r} is not 'procedural' or 'diffusers:<path>'")
