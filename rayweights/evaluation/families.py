"""Built-in task adapters for the zoo families of :mod:`rayweights.zoo`.

* ``dataset-subsets`` — classify a k-class subset of the zoo's dataset (digits offline): the zoo's
  architecture with a k-way head, fine-tuned with the zoo's optimiser on the task's training split,
  accuracy on its validation split (the split the zoo members were scored on).  Default ("random")
  initialisation: the architecture's own init for the seed.
* ``partial`` — p-diff: the task's shared base model (``rayweights.zoo.families.base_model_state``,
  read from the zoo's cache) with only the layout's parameters trainable and BN statistics frozen,
  as the members were trained.  "random" re-initialises those parameters with the architecture's
  own init; (c) "pretrained" is the base model itself.
* ``concepts`` — Denoised Neural Weights: the zoo's base image-to-image generator with LoRA + BN
  (the layout) fine-tuned with eq. 4 (L1 + conditional GAN against a fresh PatchGAN, Adam beta1 0.5)
  on the concept's pairs.  Metrics per epoch on the validation pairs: L1 (primary, [0, 1] pixel units,
  lower is better), PSNR and FID (clean-fid, ``feature_extractor``).  "random" = the base generator
  with a fresh LoRA (down random, up zero: the base's output, what a member starts from).  Task
  similarity (for (c)) is the cosine of the prompts' text embeddings (the frozen text encoder), or
  word overlap with ``similarity: tokens``.

All read the zoo's ``zoo_spec.json`` (written by ``build-zoo``) to rebuild exactly the members'
architecture, data and optimiser.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from typing import Any

import numpy as np
import torch
from torch import nn

from ..blocks import WeightLayout
from ..storage import read_bytes
from .adapters import AdapterError, register_adapter
from .protocols import BaseTaskAdapter, token_similarity

__all__ = ["SubsetTaskAdapter", "ConceptTaskAdapter", "read_zoo_spec", "position_similarity"]


def read_zoo_spec(zoo) -> tuple[Any, list[str]]:
    """(ZooSpec, held-out conditions) from ``<zoo>/zoo_spec.json``."""
    from ..config import ConfigError, from_dict
    from ..zoo.spec import ZooSpec

    loc = zoo.root.join("zoo_spec.json")
    try:
        d = json.loads(read_bytes(loc))
    except FileNotFoundError:
        raise AdapterError(f"zoo: {loc.describe()} is missing (zoos written by build-zoo carry their spec)") from None
    try:
        spec = from_dict(ZooSpec, d["spec"])
    except (ConfigError, KeyError) as exc:
        raise AdapterError(f"zoo: {loc.describe()}: {exc}") from exc
    if not spec.output:                      # caches (base models, pairs) live in the zoo
        import dataclasses

        spec = dataclasses.replace(spec, output=zoo.uri)
    return spec, list(d.get("held_out", []))


def position_similarity(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    """Task similarity for k-way heads: half the fraction of head positions holding the same class
    (those output units can be reused as they are), half the Jaccard overlap of the class sets."""
    if not a or not b:
        return 0.0
    same = sum(x == y for x, y in zip(a, b)) / max(len(a), len(b))
    jac = len(set(a) & set(b)) / len(set(a) | set(b))
    return 0.5 * same + 0.5 * jac


def _zoo_modules():
    from ..zoo import architectures, families

    return architectures, families


# ----------------------------------------------------------------------------- classifiers
class SubsetTaskAdapter(BaseTaskAdapter):
    metric = "accuracy"
    higher_is_better = True

    def __init__(self, spec, layout: WeightLayout, condition: str, lr: float | None = None,
                 weight_decay: float | None = None, optimizer: str | None = None, batch_size: int | None = None,
                 partial: bool = False):
        architectures, families = _zoo_modules()
        try:
            self.task = families.task_from_condition(condition)
        except (ValueError, IndexError) as exc:
            raise AdapterError(f"task {condition!r}: not a '<dataset>:<class>,<class>,...' condition ({exc})") from exc
        if len(self.task.classes) != spec.classes_per_task:
            raise AdapterError(f"task {condition!r}: {len(self.task.classes)} classes, the zoo's tasks have "
                               f"{spec.classes_per_task}")
        self.spec, self.layout, self.condition, self.task_id = spec, layout, condition, self.task.task_id
        self.partial = partial
        lo, hi = spec.hparams.lr
        self.lr = float(lr) if lr is not None else math.sqrt(lo * hi)
        self.weight_decay = float(weight_decay) if weight_decay is not None else math.sqrt(
            max(spec.hparams.weight_decay[0], 1e-12) * max(spec.hparams.weight_decay[1], 1e-12))
        self.optimizer = optimizer or spec.optimizer
        if self.optimizer not in ("sgd", "adam", "adamw"):
            raise AdapterError(f"family_options.optimizer: {self.optimizer!r} is not sgd, adam or adamw")
        self.batch_size = int(batch_size or spec.batch_size)
        (Xtr, ytr), (Xva, yva) = families.task_data(spec, self.task)
        self.split = {"train": (Xtr, ytr), "test": (Xva, yva)}
        self._arch = lambda: architectures.build(spec.architecture, tuple(Xtr.shape[1:]), len(self.task.classes),
                                                 **spec.arch_options)
        self._families = families
        missing = set(layout.param_names) - set(self._arch().state_dict())
        if missing:
            raise AdapterError(f"zoo layout parameter {sorted(missing)[0]} is not in architecture {spec.architecture}")

    # -- model -----------------------------------------------------------------------------
    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        model = self._arch()
        if self.partial:
            fresh = {n: v.clone() for n, v in model.state_dict().items() if n in set(self.layout.param_names)}
            model.load_state_dict(self._families.base_model_state(self.spec, self.task))
            model.load_state_dict(fresh, strict=False)        # the generated part starts from the arch's own init
        return model

    def pretrained_state_dict(self) -> dict | None:
        if not self.partial:
            return None
        base = self._families.base_model_state(self.spec, self.task)
        return {n: base[n].clone() for n in self.layout.param_names}

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        names = set(self.layout.param_names)
        for n, p in model.named_parameters():
            p.requires_grad_(not self.partial or n in names)
        params = [p for p in model.parameters() if p.requires_grad]
        return self._families.make_optimizer(self.optimizer, params, self.lr, self.weight_decay)

    def train_epoch(self, model, optimizer, epoch, seed):
        X, y = self.split["train"]
        g = torch.Generator().manual_seed(seed * 10_007 + epoch)
        steps = self._families.train_epoch(model, optimizer, X, y, self.batch_size, g,   # the zoo's own loop
                                           freeze_norm_stats=self.partial)
        return {"steps": steps}

    def evaluate(self, model, split="test"):
        X, y = self.split[split]
        m = self._families.evaluate(model, X, y)
        return {"accuracy": m["acc"], "loss": m["loss"]}

    @torch.no_grad()
    def predictions(self, model, split="test") -> np.ndarray:
        model.eval()
        return model(self.split[split][0]).argmax(1).numpy()

    def targets(self, split="test") -> np.ndarray:
        return self.split[split][1].numpy()

    def similarity(self, condition: str) -> float:
        try:
            other = self._families.task_from_condition(condition)
        except (ValueError, IndexError):
            return 0.0
        if condition.split(":", 1)[0] != self.condition.split(":", 1)[0]:
            return 0.0
        return position_similarity(self.task.classes, other.classes)


# ----------------------------------------------------------------------------- image translation
class _GANState:
    """What ``make_optimizer`` hands to ``train_epoch`` for eq. 4: G's optimiser and a fresh
    conditional PatchGAN with its own (the evaluation core treats it as an opaque optimiser)."""

    def __init__(self, opt_g, disc, opt_d, gen: torch.Generator):
        self.opt_g, self.disc, self.opt_d, self.gen = opt_g, disc, opt_d, gen


_TEXT_ENCODERS: dict = {}


class ConceptTaskAdapter(BaseTaskAdapter):
    metric = "l1"
    higher_is_better = False

    def __init__(self, spec, layout: WeightLayout, condition: str, lr: float | None = None,
                 weight_decay: float | None = None, batch_size: int | None = None, metric: str = "l1",
                 fid: bool = True, feature_extractor: str = "small:16", similarity: str = "embedding",
                 text_encoder: str | None = None):
        architectures, families = _zoo_modules()
        from ..zoo.families import concepts as C

        self.C, self._arch_mod = C, architectures
        try:
            self.task = C.Concepts().task_from_condition(spec, condition)
        except ValueError as exc:
            raise AdapterError(f"task {condition!r}: {exc}") from exc
        if metric not in ("l1", "fid"):
            raise AdapterError(f"family_options.metric: {metric!r} is not l1 or fid")
        if metric == "fid" and not fid:
            raise AdapterError("family_options: metric fid needs fid: true")
        if similarity not in ("embedding", "tokens"):
            raise AdapterError(f"family_options.similarity: {similarity!r} is not embedding or tokens")
        self.spec, self.layout, self.condition, self.task_id = spec, layout, condition, self.task.task_id
        self.metric, self.fid, self.feature_extractor = metric, bool(fid), feature_extractor
        self.similarity_kind, self.text_encoder_name = similarity, text_encoder
        lo, hi = spec.hparams.lr
        self.lr = float(lr) if lr is not None else math.sqrt(lo * hi)
        self.weight_decay = float(weight_decay) if weight_decay is not None else spec.hparams.weight_decay[0]
        self.batch_size = int(batch_size or spec.batch_size)
        (xtr, ytr), (xva, yva) = C.task_pairs(spec, self.task)
        self.split = {"train": (xtr * 2 - 1, ytr * 2 - 1), "test": (xva * 2 - 1, yva * 2 - 1)}
        self.in_shape = (3, spec.concepts.image_size, spec.concepts.image_size)
        self._extractor = None
        self._fid_ref: dict[str, str] = {}
        if self.fid:
            from .fid import build_feature_extractor

            self._extractor = build_feature_extractor(feature_extractor)     # checked now: bad spec = early error
        missing = set(layout.param_names) - set(self._build().state_dict())
        if missing:
            raise AdapterError(f"zoo layout parameter {sorted(missing)[0]} is not in architecture {spec.architecture}")

    def _build(self):
        return self._arch_mod.build(self.spec.architecture, self.in_shape, 3, **self.spec.arch_options)

    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        G = self._build()                     # fresh LoRA for this seed: down random, up zero
        base = self.C.base_generator_state(self.spec)
        G.load_state_dict({k: v for k, v in base.items() if ".lora_" not in f".{k}"}, strict=False)
        return G

    def make_optimizer(self, model):
        from ..zoo.families import make_optimizer

        names = set(self.layout.param_names)
        for n, p in model.named_parameters():
            p.requires_grad_(n in names)
        params = [p for p in model.parameters() if p.requires_grad]
        co = self.spec.concepts
        opt_g = make_optimizer(self.spec.optimizer, params, self.lr, self.weight_decay, betas=(0.5, 0.999))
        disc = self._arch_mod.build("patchgan", (6, co.image_size, co.image_size), 1, **co.discriminator)
        opt_d = torch.optim.Adam(disc.parameters(), lr=self.lr, betas=(0.5, 0.999))
        return _GANState(opt_g, disc, opt_d, torch.Generator())

    def train_epoch(self, model, state: _GANState, epoch, seed):
        """One epoch of eq. 4 (the zoo members' objective): D step, then G step on lambda*L1 + GAN."""
        from ..zoo.families import freeze_batchnorm

        xtr, ytr = self.split["train"]
        g = state.gen.manual_seed(seed * 10_007 + epoch)
        model.train()
        freeze_batchnorm(model)
        state.disc.train()
        bce = nn.BCEWithLogitsLoss()
        perm = torch.randperm(len(xtr), generator=g)
        total, steps = 0.0, 0
        for i in range(0, len(xtr), self.batch_size):
            idx = perm[i:i + self.batch_size]
            if len(idx) < 2:
                continue
            x, y = xtr[idx], ytr[idx]
            z = torch.randn(len(x), model.noise_channels, *x.shape[2:], generator=g)
            fake = model(x, z)
            d_real, d_fake = state.disc(x, y), state.disc(x, fake.detach())
            loss_d = 0.5 * (bce(d_real, torch.ones_like(d_real)) + bce(d_fake, torch.zeros_like(d_fake)))
            state.opt_d.zero_grad()
            loss_d.backward()
            state.opt_d.step()
            d_fake = state.disc(x, fake)
            l1 = (fake - y).abs().mean()
            loss_g = self.spec.concepts.lambda_l1 * l1 + bce(d_fake, torch.ones_like(d_fake))
            state.opt_g.zero_grad()
            loss_g.backward()
            state.opt_g.step()
            total += float(l1.detach()) / 2
            steps += 1
        return {"train_l1": total / max(steps, 1)}

    @torch.no_grad()
    def translate(self, model, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
        """(outputs, targets) in [-1, 1] on a split, with a fixed noise seed."""
        model.eval()
        x, y = self.split[split]
        g = torch.Generator().manual_seed(0)
        z = torch.randn(len(x), model.noise_channels, *x.shape[2:], generator=g)
        return model(x, z), y

    def _fid(self, out: torch.Tensor, split: str) -> float:
        from .fid import compute_fid, save_images

        if split not in self._fid_ref:
            d = tempfile.mkdtemp(prefix=f"rw-fid-ref-{split}-")
            save_images(self.split[split][1], d)
            self._fid_ref[split] = d
        d = tempfile.mkdtemp(prefix="rw-fid-out-")
        try:
            save_images(out, d)
            return compute_fid(d, self._fid_ref[split], self._extractor)
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def evaluate(self, model, split="test"):
        from .metrics import l1_error

        out, y = self.translate(model, split)
        l1 = l1_error(out, y) / 2                              # [-1, 1] -> [0, 1] pixel units
        mse = float((((out - y) / 2) ** 2).mean())
        m = {"l1": l1, "psnr": 10 * math.log10(1.0 / max(mse, 1e-12))}
        if self.fid:
            m["fid"] = self._fid(out, split)
        return m

    def __del__(self):
        for d in getattr(self, "_fid_ref", {}).values():
            shutil.rmtree(d, ignore_errors=True)

    def similarity(self, condition: str) -> float:
        if self.similarity_kind == "tokens":
            return token_similarity(self.condition, condition)
        from ..conditioning import TextEncoder

        key = self.text_encoder_name or ""
        if key not in _TEXT_ENCODERS:
            _TEXT_ENCODERS[key] = (TextEncoder(self.text_encoder_name), {})
        enc, cache = _TEXT_ENCODERS[key]
        for c in (self.condition, condition):
            if c not in cache:
                cache[c] = torch.nn.functional.normalize(enc.encode([c]).float().view(-1), dim=0)
        return float(cache[self.condition] @ cache[condition])

    @property
    def report_metrics(self) -> list[str]:
        return [m for m in ("l1", "fid", "psnr") if m != self.metric and (m != "fid" or self.fid)]


# ----------------------------------------------------------------------------- registration
def _subset_factory(partial: bool):
    def factory(condition: str, zoo, lr: float | None = None, weight_decay: float | None = None,
                optimizer: str | None = None, batch_size: int | None = None) -> SubsetTaskAdapter:
        spec, _ = read_zoo_spec(zoo)
        if (spec.family == "partial") != partial:
            raise AdapterError(f"family: the zoo was built with family {spec.family!r}")
        return SubsetTaskAdapter(spec, zoo.layout, condition, lr, weight_decay, optimizer, batch_size, partial)

    return factory


def _concepts_factory(condition: str, zoo, **options) -> ConceptTaskAdapter:
    spec, _ = read_zoo_spec(zoo)
    if spec.family != "concepts":
        raise AdapterError(f"family: the zoo was built with family {spec.family!r}")
    return ConceptTaskAdapter(spec, zoo.layout, condition, **options)


register_adapter("dataset-subsets")(_subset_factory(False))
register_adapter("partial")(_subset_factory(True))
register_adapter("concepts")(_concepts_factory)
