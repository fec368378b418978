"""``GeneratorState``: everything of a generator but its model weights, in one dataclass.

The same object travels to the Ray Train workers (``method.to_state()`` in the train loop config,
``GeneratorMethod.from_state`` on each worker) and is what an export folder holds beside the models::

    generator.json            the JSON fields below (format_version, method, preset, scheduler, ...)
    layout.json               the zoo layout with its normalisation stats
    conditions.safetensors    the condition cache (conditioned methods; with token states when tokens-conditioned)
    data_stats.safetensors    fitted data statistics (p-diff standardisation; absent = identity)

``pretrained`` (model folders of finished stages) and ``features_bank`` (D2NWG's dataset features of
the training conditions) only matter while training and are not exported.  Exports written before
this dataclass have the same files and fields and load unchanged (a missing ``cond_dropout``: 0).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save_file

from ..blocks import LayoutError, WeightLayout
from ..conditioning import ConditionCache
from ..storage import StorageError, exists, read_bytes, resolve
from .diffusion import SchedulerConfig
from .errors import GeneratorError

__all__ = ["GeneratorState", "FORMAT_VERSION", "GENERATOR_FILE", "LAYOUT_FILE", "DATA_STATS_FILE",
           "is_generator_export"]

FORMAT_VERSION = "rayweights.generator/1"
GENERATOR_FILE = "generator.json"
LAYOUT_FILE = "layout.json"
DATA_STATS_FILE = "data_stats.safetensors"
# fields of generator.json that are not GeneratorState fields: written for readers, derived on load
_DERIVED = ("format_version", "models", "conditioning", "num_blocks", "block_size", "parameters")


@dataclass
class GeneratorState:
    method: str
    layout: WeightLayout
    preset: str = "tiny"
    model_overrides: dict[str, dict] = field(default_factory=dict)   # the run's constructor overrides
    model_configs: dict[str, dict] | None = None                     # exact configs (None: preset + overrides)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    condition_names: list[str] = field(default_factory=list)
    conditions: ConditionCache | None = None
    text_encoder: str | None = None
    dataset_options: dict[str, Any] = field(default_factory=dict)
    latent_scale: float | None = None
    data_stats: dict[str, torch.Tensor] = field(default_factory=dict)
    cond_dropout: float = 0.0              # null-condition rate the diffusion stage trained with (CFG)
    pretrained: dict[str, str] = field(default_factory=dict)          # training only
    features_bank: torch.Tensor | None = None                        # training only

    # ------------------------------------------------------------------ the export
    def json_fields(self) -> dict[str, Any]:
        return {"method": self.method, "preset": self.preset, "model_overrides": self.model_overrides,
                "scheduler": self.scheduler.to_dict(), "condition_names": self.condition_names,
                "text_encoder": self.text_encoder, "dataset_options": self.dataset_options,
                "latent_scale": self.latent_scale, "cond_dropout": self.cond_dropout}

    def write(self, folder: str, models: Mapping[str, str], parameters: Mapping[str, int],
              conditioning: str | None) -> None:
        """Write generator.json (last), layout.json, the condition cache and data stats into the
        local ``folder``; ``models``: key -> class name of the model folders written beside them."""
        with open(os.path.join(folder, LAYOUT_FILE), "w") as f:
            f.write(self.layout.to_json())
        if self.conditions is not None:
            with open(os.path.join(folder, ConditionCache.FILE), "wb") as f:
                f.write(self.conditions.to_bytes())
        if self.data_stats:
            save_file({k: v.detach().float().contiguous().cpu() for k, v in self.data_stats.items()},
                      os.path.join(folder, DATA_STATS_FILE))
        meta = {"format_version": FORMAT_VERSION, **self.json_fields(), "models": dict(models),
                "conditioning": conditioning, "num_blocks": self.layout.num_blocks,
                "block_size": self.layout.block_size, "parameters": dict(parameters)}
        with open(os.path.join(folder, GENERATOR_FILE), "w") as f:
            json.dump(meta, f, indent=1)

    @classmethod
    def read(cls, uri: str) -> tuple["GeneratorState", dict[str, str]]:
        """The state of the export at ``uri`` (local path or ``s3://``) and its models (key -> class name)."""
        root = resolve(uri)
        try:
            meta = json.loads(read_bytes(root.join(GENERATOR_FILE)))
            layout = WeightLayout.from_json(read_bytes(root.join(LAYOUT_FILE)))
        except FileNotFoundError:
            raise GeneratorError(f"{uri}: not a generator export ({GENERATOR_FILE} or {LAYOUT_FILE} missing)") from None
        except (json.JSONDecodeError, UnicodeDecodeError, LayoutError, StorageError) as exc:
            raise GeneratorError(f"{uri}: unreadable generator export: {exc}") from exc
        if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
            got = meta.get("format_version") if isinstance(meta, dict) else None
            raise GeneratorError(f"{uri}: format_version {got!r} is not {FORMAT_VERSION!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(meta) - known - set(_DERIVED))
        if unknown:
            raise GeneratorError(f"{uri}/{GENERATOR_FILE}: unknown field(s) {unknown}")
        if not isinstance(meta.get("models"), dict):
            raise GeneratorError(f"{uri}/{GENERATOR_FILE}: models: expected a mapping of model -> class")
        cache = None
        if exists(root.join(ConditionCache.FILE)):
            cache = ConditionCache.from_bytes(read_bytes(root.join(ConditionCache.FILE)),
                                              f"{uri}/{ConditionCache.FILE}")
        stats = {}
        if exists(root.join(DATA_STATS_FILE)):          # exports from before data stats: identity
            stats = dict(st_load(read_bytes(root.join(DATA_STATS_FILE))))
        state = cls(method=meta.get("method", ""), layout=layout, preset=meta.get("preset", "tiny"),
                    model_overrides=dict(meta.get("model_overrides") or {}),
                    scheduler=SchedulerConfig.from_mapping(meta.get("scheduler")),
                    condition_names=list(meta.get("condition_names") or []), conditions=cache,
                    text_encoder=meta.get("text_encoder"), dataset_options=dict(meta.get("dataset_options") or {}),
                    latent_scale=meta.get("latent_scale"), data_stats=stats,
                    cond_dropout=float(meta.get("cond_dropout") or 0.0))     # absent: trained without it
        return state, dict(meta["models"])


def is_generator_export(uri: str) -> bool:
    """Whether ``uri`` holds a generator export (its ``generator.json``)."""
    return exists(resolve(uri).join(GENERATOR_FILE))
