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
  on the concept's pairs.  Metrics per epoch: L1 (primary, [0, 1] pixel units, lower is better) and PSNR
  on the validation pairs; FID and KID (clean-fid, ``feature_extractor``: by default the zoo's trained
  edit-operation CNN) on a metric set of ``fid_images`` (512) fresh sources and the concept's edit of them,
  with the image counts (:class:`ConceptTaskAdapter`).  "random" = the base generator
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
from ..zoo.editor import concept_by_key, make_images
from .fid import FIDError, build_feature_extractor, extractor_label, feature_metrics, image_features, zoo_extractor_spec
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
    """``concepts`` tasks (see the module doc).  FID and KID (``fid: true``) are measured on a metric
    image set of ``fid_images`` images per split (default 512), not on the ~dozen validation pairs:

    * sources: :func:`rayweights.zoo.editor.make_images` with seed ``image_seed + 1_000_003`` (test) /
      ``+ 2_000_003`` (train: best-of-N picks on it), disjoint from the zoo's training/validation sources
      (``image_seed``), its base generator's (``image_seed + 1``) and the extractor's training images;
    * targets: the concept's procedural edit of them; their features are computed once per adapter;
    * generated: the fine-tuned model's translations of the same sources (fixed noise).

    A ``diffusers:`` editor has no procedural edit: the metric set is then the split's cached pairs
    (their count, far below 500, is what is reported).  ``feature_extractor``: ``trained`` = the zoo's
    trained extractor (:func:`rayweights.evaluation.fid.zoo_extractor_spec`, made on first use),
    ``trained:<dir>``, ``inception:<dir>`` (clusters), ``small[:dim]`` (a random network: not FID).
    :attr:`metric_info` says which extractor and how many images every FID/KID used."""

    metric = "l1"
    higher_is_better = False
    FID_SEEDS = {"test": 1_000_003, "train": 2_000_003}     # offsets from the zoo's image_seed

    def __init__(self, spec, layout: WeightLayout, condition: str, lr: float | None = None,
                 weight_decay: float | None = None, batch_size: int | None = None, metric: str = "l1",
                 fid: bool = True, feature_extractor: str = "trained", fid_images: int = 512,
                 similarity: str = "embedding", text_encoder: str | None = None):
        if metric not in ("l1", "fid"):
            raise AdapterError(f"family_options.metric: {metric!r} is not l1 or fid")
        if metric == "fid" and not fid:
            raise AdapterError("family_options: metric fid needs fid: true")
        if similarity not in ("embedding", "tokens"):
            raise AdapterError(f"family_options.similarity: {similarity!r} is not embedding or tokens")
        if isinstance(fid_images, bool) or not isinstance(fid_images, int) or fid_images < 2:
            raise AdapterError(f"family_options.fid_images: expected an integer >= 2 (images per metric set; "
                               f">= 500 for a meaningful FID), got {fid_images!r}")
        self.recipe = _recipe(spec, condition, lr=lr, weight_decay=weight_decay, batch_size=batch_size)
        self.task = self.recipe.task
        self.spec, self.layout, self.condition, self.task_id = spec, layout, condition, self.task.task_id
        self.metric, self.fid, self.fid_images = metric, bool(fid), fid_images
        self.similarity_kind, self.text_encoder_name = similarity, text_encoder
        self.lr, self.weight_decay, self.batch_size = self.recipe.lr, self.recipe.weight_decay, self.recipe.batch_size
        self.split = self.recipe.split
        self._extractor = None
        self._metric_sets: dict[str, tuple[torch.Tensor, np.ndarray]] = {}
        if self.fid:
            if feature_extractor == "trained":        # the zoo's own (the factory passes the zoo's URI)
                feature_extractor = zoo_extractor_spec(spec.output, spec.concepts.image_size)
            try:
                self._extractor = build_feature_extractor(feature_extractor)   # checked now: early error
            except FIDError as exc:
                raise AdapterError(f"family_options.{exc}") from exc
        self.feature_extractor = feature_extractor
        _check_layout(self.recipe, layout, spec)

    @property
    def procedural(self) -> bool:
        return self.spec.concepts.editor == "procedural"

    @property
    def metric_info(self) -> dict[str, dict]:
        """Per image metric (``fid``, ``kid``): the extractor, what it is, and the image counts of the
        test metric set (what the report prints next to every FID/KID)."""
        if not self.fid:
            return {}
        if self.procedural:
            n = self.fid_images
            images = (f"targets: the concept's procedural edit of {n} source images (seed image_seed + "
                      f"{self.FID_SEEDS['test']}), disjoint from the training and validation pairs; generated: the "
                      f"model's translations of the same sources")
        else:
            n = len(self.split["test"][0])
            images = ("the diffusers editor's cached validation pairs only (no procedural edit to make more; "
                      "fewer than the 500 a stable FID needs)")
        info = {"extractor": self.feature_extractor, "label": extractor_label(self.feature_extractor),
                "n_generated": n, "n_target": n, "images": images}
        return {"fid": dict(info), "kid": dict(info)}

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

    def metric_set(self, split: str = "test") -> tuple[torch.Tensor, np.ndarray]:
        """(sources in [-1, 1], the targets' extractor features) of ``split``'s metric set, made once."""
        if split not in self._metric_sets:
            x_split = self.split[split][0]
            if self.procedural:
                co = self.spec.concepts
                src = make_images(self.fid_images, co.image_size, seed=co.image_seed + self.FID_SEEDS[split])
                tgt = concept_by_key(self.task.group).apply(src)
                src = (src * 2 - 1).to(x_split.device)
            else:
                src, tgt = x_split, self.split[split][1]
            self._metric_sets[split] = (src, image_features(tgt, self._extractor))
        return self._metric_sets[split]

    @torch.no_grad()
    def image_metrics(self, model, split: str = "test", batch_size: int = 256) -> dict[str, float]:
        """``fid``, ``kid``, ``fid_n_generated``, ``fid_n_target``: the model's translations of the metric
        set's sources vs its targets, through the adapter's extractor."""
        model.eval()
        src, ref = self.metric_set(split)
        g = torch.Generator().manual_seed(1)
        z = torch.randn(len(src), model.noise_channels, *src.shape[2:], generator=g).to(src.device)
        out = torch.cat([model(src[i:i + batch_size], z[i:i + batch_size]) for i in range(0, len(src), batch_size)])
        m = feature_metrics(image_features(out, self._extractor), ref)
        return {"fid": m["fid"], "kid": m["kid"], "fid_n_generated": m["n_a"], "fid_n_target": m["n_b"]}

    def evaluate(self, model, split="test"):
        out, y = self.translate(model, split)
        l1 = l1_error(out, y) / 2                              # [-1, 1] -> [0, 1] pixel units
        mse = float((((out - y) / 2) ** 2).mean())
        m = {"l1": l1, "psnr": 10 * math.log10(1.0 / max(mse, 1e-12))}
        if self.fid:
            m.update(self.image_metrics(model, split))
        return m

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
        return [m for m in ("l1", "fid", "kid", "psnr") if m != self.metric and (m in ("l1", "psnr") or self.fid)]


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
    if options.get("fid", True) and options.get("feature_extractor", "trained") == "trained":
        try:                                 # the zoo's trained extractor, where the zoo is now
            options = {**options, "feature_extractor": zoo_extractor_spec(zoo.uri, spec.concepts.image_size)}
        except FIDError as exc:
            raise AdapterError(f"family_options.{exc}") from exc
    return ConceptTaskAdapter(spec, zoo.layout, condition, **options)


# the options of the concepts family are the adapter's keywords (the factory passes them through)
_concepts_factory.options = tuple(list(inspect.signature(ConceptTaskAdapter).parameters)[3:])
register_adapter("dataset-subsets")(_subset_factory(False))
register_adapter("partial")(_subset_factory(True))
register_adapter("concepts")(_concepts_factory)
