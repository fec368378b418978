"""``concepts`` (Denoised Neural Weights): one task per text concept of image-to-image translation.

Source images (``concepts.sources``, :mod:`rayweights.zoo.sources`) are made in code
(``procedural``, the offline default) or read from the user's image folder or Parquet image table
(local or ``s3://``).  A base generator (``e2gan_lora``: ResNet blocks + a transformer block,
E2GAN-like) is trained once per zoo with L1 and cached in the zoo (``<zoo>/base/generator/``:
``config.json`` with its training configuration + ``diffusion_pytorch_model.safetensors``).  Its
objective (``concepts.base_objective``): ``mixture`` (default, as the paper's base pretrained on the
editing tasks) maps x to edit(x) for a concept drawn uniformly per image from the zoo's *training*
concepts (held-out concepts never; the list is recorded in ``config.json``), so each member's LoRA
learns its concept's residual from a generic editor; ``identity`` reproduces x (zoos built before the
option existed).  Each member starts from it with fresh LoRA adapters (its own seed) and trains only
the selected parameters — the LoRA down/up weights and the BN affine parameters (BN statistics
frozen) — with eq. 4 of the paper:

    min_G max_D  lambda * E[|y - G(x, z)|_1] + E[log D(x, y)] + E[log(1 - D(x, G(x, z)))]

alternating discriminator and generator steps (Adam, beta1 = 0.5 as in pix2pix), against a fresh
conditional PatchGAN per member.  Pairs (x, y) come from the editor (``concepts.editor``):
``procedural`` applies the concept's real image operations to the source images;
``diffusers:<path>`` edits them with an InstructPix2Pix / SD img2img pipeline, its pairs cached in
the zoo (``<zoo>/pairs/<task_id>.safetensors``) so members and resumed builds share them.  Every
cache that depends on the source images carries their identity (URI, count, size, pixel digest).

Per kept epoch a member records val/train L1 (in [0, 1] pixel units), val PSNR, and two
references on the same validation pairs: the base generator's L1 and the identity's L1 (|x - y|).
"""

from __future__ import annotations

import json
import math
import os
import re
import zlib
from functools import lru_cache

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from ...storage import exists, join, read_bytes, resolve, safetensors_metadata, write_bytes_atomic
from .. import architectures
from .. import editor as E
from .. import sources as S
from .base import Family, Recipe, Task, freeze_batchnorm, make_optimizer, plan_tasks, register_family, snapshot

__all__ = ["Concepts", "base_generator_state", "load_base_generator", "task_pairs", "BASE_DIR"]

BASE_DIR = "base/generator"


def _slug(text: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:40] or "prompt"
    return f"{s}-{zlib.crc32(text.encode()):08x}"


def _in_shape(spec) -> tuple[int, int, int]:
    return (3, spec.concepts.image_size, spec.concepts.image_size)


class Concepts(Family):
    name = "concepts"
    arch_kind = "image2image"
    score_metric = "val_l1"

    def default_select(self, spec):
        return list(architectures.CONCEPT_SELECT)

    def check(self, spec) -> None:
        co = spec.concepts
        S.check_sources(co.sources, co.sources_column, co.num_images)
        if co.editor != "procedural":
            if not co.editor.startswith("diffusers:"):
                raise ValueError(f"concepts.editor: {co.editor!r} is not 'procedural' or 'diffusers:<path>'")
            path = co.editor.split(":", 1)[1]
            if not os.path.isfile(os.path.join(path, "model_index.json")):
                raise ValueError(f"concepts.editor: {path} is not a diffusers pipeline folder (no model_index.json)")
            if not spec.tasks:
                raise ValueError("tasks: a diffusers editor needs an explicit list of prompts")

    def enumerate_tasks(self, spec) -> list[Task]:
        co = spec.concepts
        if co.editor != "procedural":
            raise ValueError("tasks: a diffusers editor needs an explicit list of prompts")
        out = []
        for c in E.all_concepts():
            if len(c.ops) > co.max_ops:
                continue
            for i in range(min(co.paraphrases, len(c.prompts))):
                out.append(Task(f"{c.key}-p{i}", c.prompts[i], (), c.key))
        return out

    def task_from_condition(self, spec, condition: str) -> Task:
        if spec.concepts.editor != "procedural":
            return Task(_slug(condition), condition, (), _slug(condition))
        try:
            c, i = E.concept_from_prompt(condition)
        except E.EditorError as exc:
            raise ValueError(f"tasks: {exc}") from None
        return Task(f"{c.key}-p{i}", c.prompts[i], (), c.key)

    def template_state_dict(self, spec) -> dict:
        return architectures.build(spec.architecture, _in_shape(spec), 3, **spec.arch_options).state_dict()

    def needs_prepare(self, spec) -> bool:
        return True

    def prepare(self, spec, device: str = "cpu") -> dict:
        base_generator_state(spec, device=device, store=True)
        return {"base": BASE_DIR}

    def train_member(self, spec, task, seed, hparams, select_names=None, device="cpu"):
        return train_concept_member(spec, task, seed, hparams, select_names, device)

    def recipe(self, spec, task, *, lr=None, weight_decay=None, optimizer=None, batch_size=None,
               device="cpu") -> "ConceptRecipe":
        return ConceptRecipe(spec, task, lr=lr, weight_decay=weight_decay, optimizer=optimizer,
                             batch_size=batch_size, device=device)


# --------------------------------------------------------------------------- data
@lru_cache(maxsize=2)
def _procedural(n: int, size: int, seed: int) -> torch.Tensor:
    return E.make_images(n, size, seed)


def _sources(spec) -> torch.Tensor:
    """The ``num_images`` source images [N, 3, S, S] in [0, 1] (made in code, or the user's)."""
    co = spec.concepts
    if co.sources == "procedural":
        return _procedural(co.num_images, co.image_size, co.image_seed)
    return S.load_sources(co.sources, co.sources_column, co.num_images, co.image_size, co.image_seed).images


def _source_identity(spec) -> dict | None:
    """What identifies user source images in cache keys (None for procedural ones: the seed does)."""
    co = spec.concepts
    if co.sources == "procedural":
        return None
    return S.load_sources(co.sources, co.sources_column, co.num_images, co.image_size, co.image_seed).identity


def _split(spec, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, validation indices) of the source images: one split shared by every task."""
    g = torch.Generator().manual_seed(10_000 + spec.concepts.image_seed)
    perm = torch.randperm(n, generator=g)
    n_val = max(1, int(n * spec.val_fraction))
    return perm[n_val:], perm[:n_val]


_EDITORS: dict = {}


def _editor(spec, device: str):
    key = (spec.concepts.editor, json.dumps(spec.concepts.editor_options, sort_keys=True), device)
    if key not in _EDITORS:
        _EDITORS[key] = E.make_editor(spec.concepts.editor, spec.concepts.editor_options, device)
    return _EDITORS[key]


def task_pairs(spec, task: Task, device: str = "cpu"):
    """((x_train, y_train), (x_val, y_val)) in [0, 1]: the task's source images and their edits."""
    co = spec.concepts
    src = _sources(spec)
    if co.editor == "procedural":
        tgt = E.concept_by_key(task.group).apply(src) if task.group else _editor(spec, device).edit(src, task.condition)
    else:
        tgt = _cached_edit(spec, task, src, device)
    tr, va = _split(spec, len(src))
    return (src[tr], tgt[tr]), (src[va], tgt[va])


def _cached_edit(spec, task: Task, src: torch.Tensor, device: str) -> torch.Tensor:
    loc = resolve(join(spec.output, "pairs", f"{task.task_id}.safetensors"))
    meta = {"editor": spec.concepts.editor, "options": spec.concepts.editor_options,
            "prompt": task.condition, "n": len(src), "size": src.shape[-1], "image_seed": spec.concepts.image_seed}
    if _source_identity(spec) is not None:
        meta["sources"] = _source_identity(spec)
    meta = json.dumps(meta, sort_keys=True)
    if exists(loc):
        raw = read_bytes(loc)
        header = safetensors_metadata(raw)
        if header.get("config") == meta:
            return st_load(raw)["target"]
    tgt = _editor(spec, device).edit(src, task.condition, seed=zlib.crc32(task.condition.encode()))
    write_bytes_atomic(loc, st_save({"target": tgt.contiguous()}, metadata={"config": meta}))
    return tgt


# --------------------------------------------------------------------------- base generator
_BASE: dict = {}


def _mixture_groups(spec) -> list[str]:
    """The zoo's training concepts (task groups), in task order: what a mixture base learns from."""
    train, _ = plan_tasks(spec)
    return list(dict.fromkeys(t.holdout_key for t in train))


def _base_config(spec) -> dict:
    """The base generator's training configuration (compared with the cached one's ``training``).
    An identity base on procedural images keeps the keys zoos were built with before sources and
    objectives existed, so their cached bases are still recognised."""
    co = spec.concepts
    cfg = {"architecture": spec.architecture, "arch_options": spec.arch_options, "image_size": co.image_size,
           "base_images": co.base_images, "base_lr": co.base_lr, "base_epochs": spec.base_epochs,
           "batch_size": spec.batch_size, "image_seed": co.image_seed}
    mixture = co.base_objective == "mixture"
    if co.sources != "procedural":
        cfg["sources"] = _source_identity(spec)
    if co.sources != "procedural" or (mixture and co.editor != "procedural"):
        # the base trains on the members' training split of the source images
        cfg.update(num_images=co.num_images, val_fraction=spec.val_fraction)
    if mixture:
        cfg["objective"] = "mixture"
        cfg["editor"] = co.editor
        if co.editor != "procedural":
            cfg["editor_options"] = co.editor_options
        cfg["concepts"] = _mixture_groups(spec)
    return cfg


def _base_data(spec, device: str):
    """(X [N, 3, S, S] in [0, 1], targets) of the base generator.  ``targets`` is None (identity),
    a list of concepts (procedural editor: applied per epoch) or a tensor [T, N, 3, S, S] of the
    training tasks' edits of X (another editor: the cached pairs, one task per concept)."""
    co = spec.concepts
    if co.editor != "procedural" or co.sources != "procedural":
        tr, _ = _split(spec, co.num_images)              # never the members' validation images
    if co.base_objective == "identity":
        if co.sources == "procedural":
            return E.make_images(co.base_images, co.image_size, seed=co.image_seed + 1), None
        return _sources(spec)[tr], None
    groups = _mixture_groups(spec)
    if co.editor == "procedural":
        X = E.make_images(co.base_images, co.image_size, seed=co.image_seed + 1) if co.sources == "procedural" \
            else _sources(spec)[tr]
        return X, [E.concept_by_key(k) for k in groups]
    train, _ = plan_tasks(spec)
    first = {}
    for t in train:
        first.setdefault(t.holdout_key, t)
    pairs = [task_pairs(spec, first[k], device)[0] for k in groups]
    return pairs[0][0], torch.stack([y for _, y in pairs])


def _mixture_targets(X: torch.Tensor, targets, choice: torch.Tensor) -> torch.Tensor:
    """edit_{choice[i]}(X[i]) for every image, one call per concept drawn."""
    if isinstance(targets, torch.Tensor):
        return targets[choice, torch.arange(len(X))]
    Y = torch.empty_like(X)
    for c in choice.unique().tolist():
        m = choice == c
        Y[m] = targets[c].apply(X[m])
    return Y


def base_generator_state(spec, device: str = "cpu", store: bool = False) -> dict:
    """The zoo's base generator weights: from ``<zoo>/base/generator/`` when it holds one trained with
    this configuration, else trained here (L1 on identity or on the training concepts' mixture, see
    the module docstring) and, with ``store``, cached."""
    cfg = _base_config(spec)
    key = (spec.output, json.dumps(cfg, sort_keys=True))
    if key in _BASE:
        return _BASE[key]
    root = join(spec.output, BASE_DIR) if spec.output else None
    if root is not None and exists(resolve(join(root, "config.json"))):
        saved = json.loads(read_bytes(resolve(join(root, "config.json"))))
        if saved.get("training") == cfg:
            _BASE[key] = st_load(read_bytes(resolve(join(root, "diffusion_pytorch_model.safetensors"))))
            return _BASE[key]
        if store:
            hint = ("; it was trained on identity: set concepts.base_objective: identity to resume this zoo"
                    if "objective" not in (saved.get("training") or {}) and spec.concepts.base_objective != "identity"
                    else "")
            raise ValueError(f"output: {root} holds a base generator trained with another configuration "
                             f"({saved.get('training')}){hint}; use another output URI")
    co = spec.concepts
    seed = co.image_seed + 7
    torch.manual_seed(seed)
    G = architectures.build(spec.architecture, _in_shape(spec), 3, **spec.arch_options).to(device)
    params = [p for n, p in G.named_parameters() if ".lora_" not in f".{n}"]   # adapters stay at init
    for n, p in G.named_parameters():
        p.requires_grad_(".lora_" not in f".{n}")
    opt = torch.optim.Adam(params, lr=co.base_lr, betas=(0.5, 0.999))
    X01, targets = _base_data(spec, device)
    X = (X01 * 2 - 1).to(device)
    g = torch.Generator().manual_seed(seed)
    G.train()
    for _ in range(spec.base_epochs):
        perm = torch.randperm(len(X), generator=g)
        if targets is not None:          # a training concept per image, drawn uniformly each epoch
            choice = torch.randint(len(targets), (len(X),), generator=g)
            Y = (_mixture_targets(X01, targets, choice) * 2 - 1).to(device)
        for i in range(0, len(X), spec.batch_size):
            idx = perm[i:i + spec.batch_size]
            x = X[idx]
            if len(x) < 2:
                continue
            y = x if targets is None else Y[idx]
            z = torch.randn(len(x), G.noise_channels, *x.shape[2:], generator=g).to(device)
            loss = (G(x, z) - y).abs().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    sd = snapshot(G)
    if store and root is not None:
        write_bytes_atomic(resolve(join(root, "diffusion_pytorch_model.safetensors")),
                           st_save({k: v.contiguous() for k, v in sd.items()}))
        write_bytes_atomic(resolve(join(root, "config.json")), json.dumps(
            {"_class_name": "ConceptGenerator", **G.config, "training": cfg,
             "final_l1": float(loss.detach()) / 2}, indent=1).encode())
    _BASE[key] = sd
    return sd


def load_base_generator(spec, device: str = "cpu") -> nn.Module:
    """The base generator module (LoRA adapters at their zero-effect init) in eval mode."""
    G = architectures.build(spec.architecture, _in_shape(spec), 3, **spec.arch_options)
    G.load_state_dict(base_generator_state(spec, device))
    return G.to(device).eval()


# --------------------------------------------------------------------------- member training
@torch.no_grad()
def _l1(G, x, y, seed: int = 0) -> float:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(len(x), G.noise_channels, *x.shape[2:], generator=g).to(x.device)
    return float(((G(x, z) - y).abs().mean()) / 2)       # [-1, 1] -> [0, 1] pixel units


class GANState:
    """What :meth:`ConceptRecipe.make_optimizer` returns for eq. 4: the generator's optimiser and a
    fresh conditional PatchGAN with its own."""

    def __init__(self, opt_g, disc, opt_d):
        self.opt_g, self.disc, self.opt_d = opt_g, disc, opt_d


class ConceptRecipe(Recipe):
    """``concepts``: the zoo's base image-to-image generator with a fresh LoRA (down random, up zero)
    trained with eq. 4 (lambda * L1 + conditional GAN against a fresh PatchGAN, Adam beta1 0.5) on
    the concept's pairs, in [-1, 1]; BatchNorm statistics stay the base's.  Metric: L1 in [0, 1]
    pixel units (lower is better)."""

    metric = "l1"
    higher_is_better = False

    def __init__(self, spec, task: Task, lr: float | None = None, weight_decay: float | None = None,
                 optimizer: str | None = None, batch_size: int | None = None, device: str = "cpu"):
        self.spec, self.task, self.device = spec, task, device
        lo, hi = spec.hparams.lr
        self.lr = float(lr) if lr is not None else math.sqrt(lo * hi)
        self.weight_decay = float(weight_decay) if weight_decay is not None else spec.hparams.weight_decay[0]
        self.optimizer = optimizer or spec.optimizer
        self.batch_size = int(batch_size or spec.batch_size)
        (xtr, ytr), (xva, yva) = task_pairs(spec, task, device)
        self.split = {"train": ((xtr * 2 - 1).to(device), (ytr * 2 - 1).to(device)),
                      "test": ((xva * 2 - 1).to(device), (yva * 2 - 1).to(device))}

    def build_model(self, seed: int) -> nn.Module:
        """The architecture with LoRA down random (from ``seed``; ``init: shared``: from the zoo's seed,
        one adapter initialisation for every member, so members' LoRA factors correspond across
        concepts) and up zero."""
        shared = self.spec.init == "shared"
        torch.manual_seed(self.spec.seed if shared else seed)
        model = architectures.build(self.spec.architecture, _in_shape(self.spec), 3, **self.spec.arch_options)
        if shared:
            torch.manual_seed(seed)           # the member's own randomness from here on
        return model

    def base_state_dict(self, store: bool = False) -> dict:
        """The base generator without its LoRA adapters (a member keeps its own seeded LoRA init)."""
        base = base_generator_state(self.spec, self.device, store=store)
        return {k: v for k, v in base.items() if ".lora_" not in f".{k}"}

    def make_optimizer(self, model, trainable=None) -> GANState:
        names = None if trainable is None else set(trainable)
        for n, p in model.named_parameters():
            p.requires_grad_(names is None or n in names)
        params = [p for p in model.parameters() if p.requires_grad]
        co = self.spec.concepts
        opt_g = make_optimizer(self.optimizer, params, self.lr, self.weight_decay, betas=(0.5, 0.999))
        disc = architectures.build("patchgan", (6, co.image_size, co.image_size), 1, **co.discriminator).to(self.device)
        opt_d = torch.optim.Adam(disc.parameters(), lr=self.lr, betas=(0.5, 0.999))
        return GANState(opt_g, disc, opt_d)

    def train_epoch(self, model, state: GANState, g, on_step=None) -> dict:
        """One epoch of eq. 4: a D step, then a G step on lambda * L1 + GAN.  Returns the steps and
        the epoch's mean G GAN loss, D loss and L1 (``train_l1``, [0, 1] pixel units)."""
        xtr, ytr = self.split["train"]
        model.train()
        freeze_batchnorm(model)          # BN statistics stay the base's: a member is base + its table rows
        state.disc.train()
        bce = nn.BCEWithLogitsLoss()
        perm = torch.randperm(len(xtr), generator=g)
        sums = {"g_gan": 0.0, "d_loss": 0.0, "train_l1": 0.0}
        steps = 0
        for i in range(0, len(xtr), self.batch_size):
            idx = perm[i:i + self.batch_size]
            if len(idx) < 2:
                continue
            x, y = xtr[idx], ytr[idx]
            z = torch.randn(len(x), model.noise_channels, *x.shape[2:], generator=g).to(x.device)
            fake = model(x, z)
            d_real, d_fake = state.disc(x, y), state.disc(x, fake.detach())
            loss_d = 0.5 * (bce(d_real, torch.ones_like(d_real)) + bce(d_fake, torch.zeros_like(d_fake)))
            state.opt_d.zero_grad()
            loss_d.backward()
            state.opt_d.step()
            d_fake = state.disc(x, fake)
            g_gan = bce(d_fake, torch.ones_like(d_fake))
            l1 = (fake - y).abs().mean()
            loss_g = self.spec.concepts.lambda_l1 * l1 + g_gan
            state.opt_g.zero_grad()
            loss_g.backward()
            state.opt_g.step()
            sums["g_gan"] += g_gan.item()
            sums["d_loss"] += loss_d.item()
            sums["train_l1"] += l1.item() / 2
            steps += 1
            if on_step is not None:
                on_step()
        return {"steps": steps, **{k: v / max(steps, 1) for k, v in sums.items()}}

    def evaluate(self, model, split: str = "test") -> dict[str, float]:
        x, y = self.split[split]
        model.eval()
        return {"l1": _l1(model, x, y), "psnr": _psnr(model, x, y)}


def train_concept_member(spec, task: Task, seed: int, hparams: dict, select_names=None, device: str = "cpu"):
    """Train one member with the family's recipe; returns its kept checkpoints [(epoch, state_dict, metrics)]."""
    recipe = ConceptRecipe(spec, task, hparams["lr"], hparams["weight_decay"], device=device)
    base = recipe.base_state_dict()
    (xtr, ytr), (xva, yva) = recipe.split["train"], recipe.split["test"]
    G = recipe.build_model(seed)
    # base weights, but this member's own (seeded) LoRA init: down random, up zero
    G.load_state_dict(base, strict=False)
    G.to(device)
    state = recipe.make_optimizer(G, select_names)
    g = torch.Generator().manual_seed(seed)
    G.eval()
    base_l1 = _l1(G, xva, yva)
    identity_l1 = float((xva - yva).abs().mean() / 2)
    kept = []
    epochs = hparams["epochs"]
    for epoch in range(1, epochs + 1):
        losses = recipe.train_epoch(G, state, g)
        if epoch > epochs - spec.keep_last:
            G.eval()
            val = _l1(G, xva, yva)
            m = {"train_l1": _l1(G, xtr, ytr), "val_l1": val,
                 "val_psnr": _psnr(G, xva, yva),
                 "base_val_l1": base_l1, "identity_val_l1": identity_l1,
                 "g_gan": losses["g_gan"], "d_loss": losses["d_loss"]}
            if not all(math.isfinite(v) for v in m.values()):
                raise FloatingPointError(f"non-finite metrics {m} (lr {hparams['lr']:.3g} too high?)")
            kept.append((epoch, snapshot(G), m))
    return kept


@torch.no_grad()
def _psnr(G, x, y, seed: int = 0) -> float:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(len(x), G.noise_channels, *x.shape[2:], generator=g).to(x.device)
    mse = float((((G(x, z) - y) / 2) ** 2).mean())
    return 10 * math.log10(1.0 / max(mse, 1e-12))


register_family(Concepts())
