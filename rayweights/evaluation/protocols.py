"""The two small contracts the evaluation suite is written against.

* :class:`TaskAdapter` knows one task (a held-out dataset subset, a concept, ...): how to build its
  target model, which parameters the zoo layout covers, how to fine-tune one epoch and how to score
  the model.  Task families (``rayweights.evaluation.adapters``) implement it.
* :class:`WeightSampler` produces weight blocks for a condition: a trained generator export
  (``rayweights.sampling.load_sampler``), a folder of samples written by ``sample-weights``, or the
  fitted-Gaussian baseline.

Both are :class:`typing.Protocol` classes (structural typing); :class:`BaseTaskAdapter` supplies
the parts most adapters share (strict loading of the layout's parameters, task similarity).
"""

from __future__ import annotations

import re
from typing import Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from ..blocks import LayoutError, WeightLayout

__all__ = ["TaskAdapter", "WeightSampler", "BaseTaskAdapter", "load_layout_params", "condition_tokens",
           "token_similarity"]


@runtime_checkable
class TaskAdapter(Protocol):
    """One evaluation task.

    ``metric`` names the primary entry of :meth:`evaluate`'s dict (``"accuracy"``, ``"l1"``,
    ``"fid"``); ``higher_is_better`` says which way it improves.
    """

    task_id: str
    condition: str
    metric: str
    higher_is_better: bool

    def build_model(self, seed: int) -> torch.nn.Module:
        """The target model with its default ("random"/base) initialisation for ``seed``."""

    def layout_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The model's parameters covered by the zoo layout (names/shapes/dtypes of the layout)."""

    def load_layout_state_dict(self, model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load exactly the layout's parameters (strict on those; raise naming a bad one)."""

    def make_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        """The fine-tuning optimiser (created once per fine-tuning run)."""

    def train_epoch(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, epoch: int,
                    seed: int) -> dict[str, float]:
        """One epoch of fine-tuning on the task's training split; returns e.g. {"loss": ...}."""

    def evaluate(self, model: torch.nn.Module, split: str = "test") -> dict[str, float]:
        """Metrics on ``split`` ("train" or "test"), including :attr:`metric`."""

    def predictions(self, model: torch.nn.Module, split: str = "test") -> np.ndarray | None:
        """Predicted labels on ``split`` (for the wrong-prediction IoU), or None if not a classifier."""

    def targets(self, split: str = "test") -> np.ndarray | None:
        """True labels of ``split``, aligned with :meth:`predictions`, or None."""

    def similarity(self, condition: str) -> float:
        """How similar a zoo condition is to this task (higher = closer); picks the pretrained baseline."""


@runtime_checkable
class WeightSampler(Protocol):
    """Produces weight blocks for a condition.

    ``sample`` returns float32 ``[n, layout.num_blocks, layout.block_size]``; if ``normalized`` is
    True the blocks are in the layout's per-group normalised space (undo with
    ``layout.denormalize``), else raw weights.  ``condition`` is None for unconditional models.
    """

    layout: WeightLayout
    normalized: bool

    def sample(self, condition: str | None, n: int, seed: int = 0) -> torch.Tensor: ...


def load_layout_params(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor],
                       layout: WeightLayout | Sequence[str]) -> None:
    """Copy exactly the layout's parameters into ``model`` (a strict load of the selected params).

    Every name of the layout must be in ``state_dict`` and in the model with the same shape, and
    ``state_dict`` must hold nothing else; other model entries keep their values.
    """
    names = layout.param_names if isinstance(layout, WeightLayout) else list(layout)
    extra = sorted(set(state_dict) - set(names))
    if extra:
        raise LayoutError(f"{extra[0]}: not a parameter of the layout ({len(extra)} extra entries)")
    own = model.state_dict()
    for n in names:
        if n not in state_dict:
            raise LayoutError(f"{n}: missing from the weights to load")
        if n not in own:
            raise LayoutError(f"{n}: the target model has no such parameter")
        if tuple(own[n].shape) != tuple(state_dict[n].shape):
            raise LayoutError(f"{n}: shape {tuple(state_dict[n].shape)} does not match the model's "
                              f"{tuple(own[n].shape)}")
    result = model.load_state_dict({n: state_dict[n] for n in names}, strict=False)
    if result.unexpected_keys:
        raise LayoutError(f"{result.unexpected_keys[0]}: unexpected in the target model")


_TOKEN_RE = re.compile(r"[A-Za-z]+|\d+")


def condition_tokens(condition: str) -> set[str]:
    """Lower-case word/number tokens of a condition ("digits:0,1,2" -> {"digits", "0", "1", "2"})."""
    return {t.lower() for t in _TOKEN_RE.findall(condition or "")}


def token_similarity(a: str, b: str) -> float:
    """Jaccard overlap of :func:`condition_tokens` (task overlap for "family:items" conditions)."""
    ta, tb = condition_tokens(a), condition_tokens(b)
    if not ta and not tb:
        return 1.0
    return len(ta & tb) / max(1, len(ta | tb))


class BaseTaskAdapter:
    """Defaults shared by adapters: strict layout loading, Jaccard task similarity, no predictions.

    Subclasses set ``task_id``, ``condition``, ``metric``, ``higher_is_better`` and ``layout`` and
    implement ``build_model``, ``make_optimizer``, ``train_epoch`` and ``evaluate``.
    """

    task_id: str = ""
    condition: str = ""
    metric: str = "accuracy"
    higher_is_better: bool = True
    layout: WeightLayout

    def layout_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        sd = model.state_dict()
        return {n: sd[n].detach().clone() for n in self.layout.param_names}

    def load_layout_state_dict(self, model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
        load_layout_params(model, state_dict, self.layout)

    def predictions(self, model: torch.nn.Module, split: str = "test") -> np.ndarray | None:
        return None

    def targets(self, split: str = "test") -> np.ndarray | None:
        return None

    def similarity(self, condition: str) -> float:
        return token_similarity(self.condition, condition)
