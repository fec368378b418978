"""Task families: ``dataset-subsets`` (D2NWG), ``partial`` (p-diff), ``concepts`` (Denoised Neural
Weights).  A family enumerates tasks and trains one member of one task; see :class:`Family`.
``family.recipe(spec, task)`` (a :class:`Recipe`: build model, base weights, optimiser, split,
train epoch, evaluate) is how it trains: the members are trained with it and the evaluation
fine-tunes with it.
"""

from __future__ import annotations

from .base import (FAMILIES, Family, Recipe, Task, draw_hparams, evaluate, freeze_batchnorm, get_family,
                   make_optimizer, plan_tasks, register_family, resolve_device, train_epoch)
from .data import dataset_prefix, load_dataset, task_split
from .subsets import base_model_state, enumerate_tasks, task_data, task_from_condition
from . import concepts  # noqa: E402,F401  (registers the family)

__all__ = ["FAMILIES", "Family", "Recipe", "Task", "get_family", "register_family", "draw_hparams", "evaluate",
           "train_epoch", "plan_tasks", "freeze_batchnorm", "make_optimizer", "resolve_device", "load_dataset",
           "dataset_prefix", "task_split", "task_data", "enumerate_tasks", "task_from_condition",
           "base_model_state", "train_member", "template_state_dict", "condition_features"]


def template_state_dict(spec, k: int | None = None) -> dict:
    """A state_dict with the names/shapes of ``spec``'s member architecture (``k`` is kept for
    callers of the classifier families; the spec's classes_per_task is used)."""
    return get_family(spec.family).template_state_dict(spec)


def train_member(spec, task: Task, seed: int, hparams: dict, select_names=None, device: str = "cpu"):
    """Train one member of ``task``: -> its kept checkpoints [(step, state_dict, metrics)]."""
    return get_family(spec.family).train_member(spec, task, seed, hparams, select_names, device)


def condition_features(spec, condition: str, samples_per_class: int = 10, seed: int = 0):
    """float32 ``[C, K, d]``: ``samples_per_class`` training examples of each class of the task
    ``condition`` names, from the data ``spec``'s family builds (any dataset the zoo can use:
    digits, image folders, torchvision, Parquet tables, frozen CLIP features)."""
    return get_family(spec.family).condition_features(spec, condition, int(samples_per_class), int(seed))
