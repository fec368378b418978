"""Built-in task adapters for the zoo families of :mod:`rayweights.zoo`.

* ``dataset-subsets`` — classify a k-class subset of the zoo's dataset (digits offline): the zoo's
  architecture with a k-way head, fine-tuned with the zoo's optimiser on the task's training split,
  accuracy on its validation split (the split the zoo members were scored on).  Default ("random")
  initialisation: the architecture's own init for the seed.
* ``partial`` — p-diff: the task's shared base model (the recipe's base weights, read from the
  zoo's cache) with only the layout's parameters trainable and BN statistics frozen,
  as the members were trained.  "random" re-initialises those parameters with the architecture's
  own init; (c) "pretrained" is the base model itself.
* ``concepts`` — Denoised Neural Weights: the zoo's base image-to-image generator with LoRA + BN
  (the layout) fine-tuned with eq. 4 (L1 + conditional GAN against a fresh PatchGAN, Adam beta1 0.5)
  on the concept's pairs.  Metrics per epoch on the validation pairs: L1 (primary, [0, 1] pixel units,
  lower is better), PSNR and FID (clean-fid, ``feature_extractor``).  "random" = the base generator
  with a fresh LoRA (down random, up zero: the base's output, what a member starts from).  Task
  similarity (for (c)) is the cosine of the prompts' text embeddings (the frozen text encoder), or
  word overlap with ``similarity: tokens``.

All read the zoo's ``zoo_spec.json`` (written by ``build-zoo``) and train with the zoo family's own
recipe (``rayweights.zoo.families.get_family(...).recipe``: model, base weights, optimiser, split,
epoch, metric), the one its members were trained with; hyper-parameters not given in
``family_options`` are the centre of the zoo's ranges.
"""

from __future__ import annotations

import inspect
import math
import shutil
import tempfile
from typing import Any

import numpy as np
import torch
from torch import nn

from ..blocks import WeightLayout
from ..conditioning import TextEncoder
from ..config import ConfigError
from ..zoo.families import get_family
from ..zoo.spec import read_zoo_spec as _read_spec
from .adapters import AdapterError, register_adapter
from .fid import build_feature_extractor, compute_fid, save_images
from .metrics import l1_error
from .protocols import BaseTaskAdapter, token_similarity

__all__ = ["SubsetTaskAdapter", "ConceptTaskAdapter", "read_zoo_spec", "position_similarity"]


def read_zoo_spec(zoo) -> tuple[Any, list[str]]:
    """(ZooSpec, held-out conditions) from ``<zoo>/zoo_spec.json`` (AdapterError when missing or bad)."""
    loc = zoo.root.join("zoo_spec.json")
    try:
        spec, held_out = _read_spec(zoo.uri)
    except (ConfigError, KeyError, ValueError) as exc:
        raise AdapterError(f"zoo: {loc.describe()}: {exc}") from exc
    if spec is None:
        raise AdapterError(f"zoo: {loc.describe()} is missing (zoos written by build-zoo carry their spec)")
    return spec, held_out


def position_similarity(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    """Task similarity for k-way heads: half the fraction of head positions holding the same class
    (those output units can be reused as they are), half the Jaccard overlap of the class sets."""
    if not a or not b:
        return 0.0
    same = sum(x == y for x, y in zip(a, b)) / max(len(a), len(b))
    jac = len(set(a) & set(b)) / len(set(a) | set(b))
    return 0.5 * same + 0.5 * jac


def _recipe(spec, condition: str, what: str = "", **hparams):
    """The zoo family's task and training recipe for ``condition`` (AdapterError naming the option)."""
    family = get_family(spec.family)
    try:
        task = family.task_from_condition(spec, condition)
    except (ValueError, IndexError) as exc:
        raise AdapterError(f"task {condition!r}: {what}{exc}") from exc
    try:
        return family.recipe(spec, task, **hparams)
    except ValueError as exc:                       # a bad option ("optimizer: ...") or the task's data
        key = str(exc).split(":", 1)[0]
        raise AdapterError(f"family_options.{exc}" if key in hparams else f"task {condition!r}: {exc}") from exc


def _check_layout(recipe, layout: WeightLayout, spec) -> None:
    with torch.random.fork_rng(devices=[]):          # a throw-away model: leave the global RNG as it was
        names = set(recipe.build_model(0).state_dict())
    missing = set(layout.param_names) - names
    if missing:
        raise AdapterError(f"zoo layout parameter {sorted(missing)[0]} is not in architecture {spec.architecture}")


# ----------------------------------------------------------------------------- classifiers
class SubsetTaskAdapter(BaseTaskAdapter):
    metric = "accuracy"
    higher_is_better = True

    def __init__(self, spec, layout: WeightLayout, condition: str, lr: float | None = None,
                 weight_decay: float | None = None, optimizer: str | None = None, batch_size: int | None = None,
                 partial: bool = False):
        self.recipe = _recipe(spec, condition, "not a '<dataset>:<class>,<class>,...' condition: ", lr=lr, weight_decay=weight_decay, optimizer=optimizer,
                              batch_size=batch_size)
        self.task = self.recipe.task
        if len(self.task.classes) != spec.classes_per_task:
            raise AdapterError(f"task {condition!r}: {len(self.task.classes)} classes, the zoo's tasks have "
                               f"{spec.classes_per_task}")
        self.spec, self.layout, self.condition, self.task_id = spec, layout, condition, self.task.task_id
        self.partial = partial
        self.lr, self.weight_decay = self.recipe.lr, self.recipe.weight_decay
        self.optimizer, self.batch_size = self.recipe.optimizer, self.recipe.batch_size
        self.split = self.recipe.split
        _check_layout(self.recipe, layout, spec)

    # -- model -----------------------------------------------------------------------------
    def build_model(self, seed: int) -> nn.Module:
        model = self.recipe.build_model(seed)
        if self.partial:
            fresh = {n: v.clone() for n, v in model.state_dict().items() if n in set(self.layout.param_names)}
            model.load_state_dict(self.recipe.base_state_dict())
            model.load_state_dict(fresh, strict=False)        # the generated part starts from the arch's own init
        return model

    def pretrained_state_dict(self) -> dict | None:
        if not self.partial:
            return None
        base = self.recipe.base_state_dict()
        return {n: base[n].clone() for n in self.layout.param_names}

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return self.recipe.make_optimizer(model, self.layout.param_names if self.partial else None)

    def train_epoch(self, model, optimizer, epoch, seed):
        g = torch.Generator().manual_seed(seed * 10_007 + epoch)
        return {"steps": self.recipe.train_epoch(model, optimizer, g)["steps"]}     # the zoo's own loop

    def evaluate(self, model, split="test"):
        return self.recipe.evaluate(model, split)

    @torch.no_grad()
    def predictions(self, model, split="test") -> np.ndarray:
        model.eval()
        return model(self.split[split][0]).argmax(1).numpy()

    def targets(self, split="test") -> np.ndarray:
        return self.split[split][1].numpy()

    def similarity(self, condition: str) -> float:
        if condition.split(":", 1)[0] != self.condition.split(":", 1)[0]:
            return 0.0
        try:
            other = get_family(self.spec.family).task_from_condition(self.spec, condition)
        except (ValueError, IndexError):
            return 0.0
        return position_similarity(self.task.classes, other.classes)


# ----------------------------------------------------------------------------- image translation
_TEXT_ENCODERS: dict = {}


class ConceptTaskAdapter(BaseTaskAdapter):
    metric = "l1"
    higher_is_better = False

    def __init__(self, spec, layout: WeightLayout, condition: str, lr: float | None = None,
                 weight_decay: float | None = None, batch_size: int | None = None, metric: str = "l1",
                 fid: bool = True, feature_extractor: str = "small:16", similarity: str = "embedding",
                 text_encoder: str | None = None):
        if metric not in ("l1", "fid"):
            raise AdapterError(f"family_options.metric: {metric!r} is not l1 or fid")
        if metric == "fid" and not fid:
            raise AdapterError("family_options: metric fid needs fid: true")
        if similarity not in ("embedding", "tokens"):
            raise AdapterError(f"family_options.similarity: {similarity!r} is not embedding or tokens")
        self.recipe = _recipe(spec, condition, lr=lr, weight_decay=weight_decay, batch_size=batch_size)
        self.task = self.recipe.task
        self.spec, self.layout, self.condition, self.task_id = spec, layout, condition, self.task.task_id
        self.metric, self.fid, self.feature_extractor = metric, bool(fid), feature_extractor
        self.similarity_kind, self.text_encoder_name = similarity, text_encoder
        self.lr, self.weight_decay, self.batch_size = self.recipe.lr, self.recipe.weight_decay, self.recipe.batch_size
        self.split = self.recipe.split
        self._extractor = None
        self._fid_ref: dict[str, str] = {}
        if self.fid:
            self._extractor = build_feature_extractor(feature_extractor)     # checked now: bad spec = early error
        _check_layout(self.recipe, layout, spec)

    def build_model(self, seed: int) -> nn.Module:
        G = self.recipe.build_model(seed)            # fresh LoRA for this seed: down random, up zero
        G.load_state_dict(self.recipe.base_state_dict(), strict=False)
        return G

    def make_optimizer(self, model):
        return self.recipe.make_optimizer(model, self.layout.param_names)

    def train_epoch(self, model, state, epoch, seed):
        """One epoch of eq. 4 (the zoo members' objective): D step, then G step on lambda*L1 + GAN."""
        g = torch.Generator().manual_seed(seed * 10_007 + epoch)
        return {"train_l1": self.recipe.train_epoch(model, state, g)["train_l1"]}

    @torch.no_grad()
    def translate(self, model, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
        """(outputs, targets) in [-1, 1] on a split, with a fixed noise seed."""
        model.eval()
        x, y = self.split[split]
        g = torch.Generator().manual_seed(0)
        z = torch.randn(len(x), model.noise_channels, *x.shape[2:], generator=g)
        return model(x, z), y

    def _fid(self, out: torch.Tensor, split: str) -> float:
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


# the options of the concepts family are the adapter's keywords (the factory passes them through)
_concepts_factory.options = tuple(list(inspect.signature(ConceptTaskAdapter).parameters)[3:])
register_adapter("dataset-subsets")(_subset_factory(False))
register_adapter("partial")(_subset_factory(True))
register_adapter("concepts")(_concepts_factory)
