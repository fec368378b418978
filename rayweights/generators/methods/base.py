"""``GeneratorMethod``: one uniform interface over the weight generators, and the registry of methods.

A method owns its models (diffusers ``ModelMixin``s), the zoo layout *with* its per-group
normalisation stats, the noise schedule (:class:`rayweights.generators.diffusion.SchedulerConfig`)
and the condition encoders/cache, and offers:

* ``stages``: the training stages in order, each training one model (``stage_model``) on one
  table unit (``stage_unit``: ``"block"`` rows or whole ``"checkpoint"`` vectors);
* ``prepare(stage, batch)``: a raw table batch (``block``/``block_index`` or ``weights``, plus
  ``cond_id``) -> normalised model inputs, with frozen earlier-stage encoders applied;
* ``trainer_module(stage)``: the ``nn.Module`` whose ``forward(**prepared)`` returns the stage loss
  (what DeepSpeed wraps); ``loss(stage, batch)`` = both in one call;
* ``sample(conditions, num_samples, mode=..., guidance_scale=..., ...)``: normalised weight blocks
  ``[len(conditions) * num_samples, num_blocks, block_size]`` (padding exactly 0), through
  :func:`rayweights.generators.diffusion.denoise`;

Classifier-free guidance (conditioned methods): with ``cond_dropout`` p > 0 the diffusion stage's
``prepare`` replaces each row's condition by the *null condition* with probability p (torch's RNG);
the null condition is a fixed all-zeros vector of the condition width (no extra learned state, so
the model state and its files are unchanged); token-conditioned methods (``uses_tokens``: a
Denoised Weights generator with ``condition_mode: tokens``) null a row to zero token states whose
mask keeps only position 0 and a zero pooled vector (:meth:`TokenCondition.null`).  ``sample(..., guidance_scale=s)`` then uses
``out_null + s * (out_cond - out_null)`` with the same zeros vector; s = 1 is plain conditional
sampling (one pass), s = 0 sampling with the null condition.  ``cond_dropout`` is saved with the
generator, and guidance on a generator trained with p = 0 is refused.
* ``to_state()`` / ``from_state(state)``: a :class:`GeneratorState` (Ray Train workers);
  ``save_pretrained(path)`` / ``rayweights.generators.load_generator`` (local folder or ``s3://``).
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any, ClassVar, Mapping, Sequence

import torch
from torch import nn

from ...blocks import WeightLayout
from ...conditioning import ConditionCache, TextEncoder, TokenCondition
from ...config import check_keywords
from ...storage import resolve
from ..diffusion import SchedulerConfig, denoise, guided, make_scheduler
from ..errors import GeneratorError
from ..io import load_model, upload_dir
from ..presets import get_preset
from ..state import GeneratorState

__all__ = ["GeneratorMethod", "METHODS", "register_method", "build_method", "count_parameters"]

log = logging.getLogger(__name__)

METHODS: dict[str, type["GeneratorMethod"]] = {}


def register_method(cls: type["GeneratorMethod"]) -> type["GeneratorMethod"]:
    """Class decorator: make a method known to ``build_method``, exports and Ray Train states by its ``name``."""
    METHODS[cls.name] = cls
    return cls


def build_method(name: str, layout: WeightLayout, preset: str = "tiny", **kwargs) -> "GeneratorMethod":
    """A fresh method ``name`` on ``layout`` (keywords: those of :class:`GeneratorMethod`)."""
    if name not in METHODS:
        raise GeneratorError(f"method: unknown method {name!r} (known: {sorted(METHODS)})")
    return METHODS[name](layout, preset, **kwargs)


def _cond_device(cond) -> torch.device:
    return cond.mask.device if isinstance(cond, TokenCondition) else cond.device


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class GeneratorMethod:
    name: ClassVar[str] = ""
    stages: ClassVar[tuple[str, ...]] = ()
    stage_model: ClassVar[dict[str, str]] = {}
    stage_unit: ClassVar[dict[str, str]] = {}
    model_class: ClassVar[dict[str, type]] = {}
    conditioning: ClassVar[str | None] = None        # "text" | "dataset" | None

    def __init__(self, layout: WeightLayout, preset: str = "tiny", *,
                 model_overrides: Mapping[str, Mapping] | None = None,
                 scheduler: SchedulerConfig | Mapping[str, Any] | None = None,
                 condition_names: Sequence[str] | None = None, conditions: ConditionCache | None = None,
                 text_encoder: str | None = None, dataset_options: Mapping[str, Any] | None = None,
                 latent_scale: float | None = None, pretrained: Mapping[str, str] | None = None,
                 cond_dropout: float = 0.0,
                 models: Mapping[str, nn.Module] | None = None, model_configs: Mapping[str, Mapping] | None = None):
        """``models``/``model_configs``: a saved generator's models and their exact configs; otherwise
        each model is built from the ``preset`` with ``model_overrides`` (or loaded from ``pretrained``).
        ``cond_dropout``: probability of the null condition per training row of the diffusion stage."""
        if not isinstance(layout, WeightLayout):
            raise GeneratorError(f"layout: expected a WeightLayout, got {type(layout).__name__}")
        if not layout.has_stats:
            raise GeneratorError("layout: no per-group normalisation stats (fit them with layout.fit_stats)")
        self.layout, self.preset = layout, preset
        if not 0.0 <= cond_dropout < 1.0:
            raise GeneratorError(f"cond_dropout: must be in [0, 1), got {cond_dropout}")
        if cond_dropout and self.conditioning is None:
            raise GeneratorError(f"cond_dropout: method {self.name} is unconditional (cond_dropout must be 0)")
        self.cond_dropout = float(cond_dropout)
        base = get_preset(self.name, preset)
        overrides = {k: dict(v) for k, v in (model_overrides or {}).items()}
        unknown = sorted(set(overrides) - set(base))
        if unknown:
            raise GeneratorError(f"model: unknown model(s) {unknown} for method {self.name} (has {sorted(base)})")
        for key, kwargs in overrides.items():         # a typo fails here, not when the model is first built
            try:
                check_keywords(self.model_class[key], kwargs, f"model.{key}")
            except ValueError as exc:
                raise GeneratorError(str(exc)) from None
        self.model_overrides = overrides
        if model_configs is not None:                 # a saved generator: configs exactly as trained
            self.model_configs = {k: dict(v) for k, v in model_configs.items()}
        else:
            self.model_configs = {k: {**base[k], **overrides.get(k, {})} for k in base}
        self.scheduler = SchedulerConfig.from_mapping(scheduler)
        self.conditions = conditions
        self.condition_names = list(condition_names if condition_names is not None else
                                    (conditions.conditions if conditions is not None else []))
        self.text_encoder_name = text_encoder
        self.dataset_options = {"samples_per_class": 10, "seed": 0, **dict(dataset_options or {})}
        self.latent_scale = latent_scale
        self.pretrained = dict(pretrained or {})
        self.models: dict[str, nn.Module] = dict(models or {})
        self.features_bank: torch.Tensor | None = None
        # method-specific fitted data statistics (p-diff: per-coordinate input standardisation and the
        # latent mean); tensors, saved as data_stats.safetensors next to generator.json
        self.data_stats: dict[str, torch.Tensor] = {}
        self._trainers: dict[str, nn.Module] = {}
        self._text_encoder: TextEncoder | None = None
        self.check_layout()

    @property
    def scheduler_config(self) -> dict[str, Any]:
        """The noise schedule as ``DDPMScheduler`` keywords."""
        return self.scheduler.to_dict()

    # ------------------------------------------------------------------ configuration
    @property
    def flat_dim(self) -> int:
        return self.layout.num_blocks * self.layout.block_size

    def _fill(self, key: str, field: str, value, what: str) -> None:
        cfg = self.model_configs[key]
        if field in cfg and cfg[field] is not None and cfg[field] != value:
            raise GeneratorError(f"model.{key}.{field}: the generator config says {cfg[field]} but {what} is {value} "
                                 f"(layout/block size mismatch between table and generator)")
        cfg[field] = value

    def check_layout(self) -> None:
        """Fill data-dependent model fields from the layout; raise on a mismatch."""

    def model_config(self, key: str) -> dict:
        return dict(self.model_configs[key])

    def model(self, key: str) -> nn.Module:
        """The model ``key``: trained/loaded if available, else freshly initialised from its config."""
        if key not in self.models:
            if key in self.pretrained:
                self.models[key] = load_model(self.pretrained[key], self.model_class[key])
            else:
                self.models[key] = self.model_class[key](**self.model_config(key))
        return self.models[key]

    def frozen(self, key: str, device) -> nn.Module:
        m = self.model(key)
        m.requires_grad_(False).eval()
        return m.to(device) if next(m.parameters()).device != torch.device(device) else m

    def num_parameters(self) -> dict[str, int]:
        return {k: count_parameters(self.model(k)) for k in self.model_class}

    # ------------------------------------------------------------------ conditions
    @property
    def text_encoder(self) -> TextEncoder:
        if self._text_encoder is None:
            self._text_encoder = TextEncoder(self.text_encoder_name)
        return self._text_encoder

    @property
    def uses_tokens(self) -> bool:
        """Whether the model cross-attends to token states (a :class:`TokenCondition` per row)."""
        return False

    def condition_table(self, device) -> torch.Tensor:
        if self.conditions is None:
            raise GeneratorError(f"method {self.name}: no condition embeddings (build the condition cache first)")
        return self.conditions.embeddings.to(device)

    def encode_conditions(self, conditions: Sequence[str | None], device="cpu") -> torch.Tensor | TokenCondition | None:
        """Embeddings [n, D] for conditions (the cache, else the frozen encoder) — a :class:`TokenCondition`
        (tokens, mask, pooled) for token-conditioned methods; None if unconditioned."""
        if self.conditioning is None:
            return None
        if any(c is None for c in conditions):
            raise GeneratorError(f"method {self.name} is {self.conditioning}-conditioned: a condition is required")
        missing = [c for c in dict.fromkeys(conditions) if self.conditions is None or c not in self.conditions]
        if missing:
            new = self._encode_new(missing)
            tok = new if isinstance(new, TokenCondition) else None
            emb = tok.pooled if tok is not None else new
            if self.conditions is None:
                self.conditions = (ConditionCache.from_tokens(missing, tok, self.conditioning, self._encoder_name())
                                   if tok is not None else
                                   ConditionCache(missing, emb, self.conditioning, self._encoder_name()))
            else:
                self.conditions.extend(missing, emb, tok)
        if self.uses_tokens:
            return self.conditions.lookup_tokens(conditions).to(device)
        return self.conditions.lookup(conditions).to(device)

    def _encode_new(self, conditions: list[str]) -> torch.Tensor | TokenCondition:
        raise GeneratorError(f"method {self.name}: cannot encode conditions {conditions[:3]}")

    def _encoder_name(self) -> str:
        return ""

    # ------------------------------------------------------------------ training
    def _normalized(self, stage: str, batch: Mapping[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
        L = self.layout
        if self.stage_unit[stage] == "block":
            if "block" not in batch or "block_index" not in batch:
                raise GeneratorError(f"stage {stage}: batch needs 'block' and 'block_index' (got {sorted(batch)})")
            bidx = batch["block_index"].to(device).long()
            blocks = batch["block"].to(device).float()
            if blocks.shape[-1] != L.block_size:
                raise GeneratorError(f"batch: block size {blocks.shape[-1]} != layout block_size {L.block_size}")
            return {"x0": L.normalize(blocks, block_index=bidx), "block_index": bidx,
                    "mask": L.valid_mask.to(device)[bidx]}
        if "weights" not in batch:
            raise GeneratorError(f"stage {stage}: batch needs 'weights' (got {sorted(batch)})")
        w = batch["weights"].to(device).float()
        if w.shape[-1] != self.flat_dim:
            raise GeneratorError(f"batch: weight vector length {w.shape[-1]} != layout {L.num_blocks} x {L.block_size}")
        x0 = L.normalize(w.view(-1, L.num_blocks, L.block_size)).view(w.shape[0], -1)
        return {"x0": x0, "mask": L.valid_mask.to(device).view(1, -1)}

    def _cond(self, batch, device) -> torch.Tensor | TokenCondition:
        """The rows' conditions, gathered from the cache by the batch's ``cond_id`` (the table
        carries ids, never embeddings or token states)."""
        if "cond_id" not in batch:
            raise GeneratorError(f"method {self.name}: batch has no 'cond_id' column")
        ids = batch["cond_id"].to(device).long()
        if bool((ids < 0).any()):
            raise GeneratorError("batch: a row's condition is not in the condition cache")
        if self.uses_tokens:
            if self.conditions is None:
                raise GeneratorError(f"method {self.name}: no condition embeddings (build the condition cache first)")
            return self._token_table(device)[ids]
        return self.condition_table(device)[ids]

    def _token_table(self, device) -> TokenCondition:
        """The cache's token conditions on ``device``, copied there once per cache size."""
        key = (str(device), len(self.conditions), id(self.conditions))
        memo = getattr(self, "_token_memo", None)
        if memo is None or memo[0] != key:
            memo = (key, self.conditions.token_condition().to(device))
            self._token_memo = memo
        return memo[1]

    def _train_cond(self, batch, device) -> torch.Tensor | TokenCondition:
        """The diffusion stage's conditions: each row nulled (:meth:`null_condition`) with probability
        ``cond_dropout``."""
        cond = self._cond(batch, device)
        if self.cond_dropout > 0:
            drop = torch.rand(len(cond), device=_cond_device(cond)) < self.cond_dropout
            cond = cond.null_rows(drop) if isinstance(cond, TokenCondition) else cond.masked_fill(drop.unsqueeze(-1), 0.0)
        return cond

    @staticmethod
    def null_condition(cond: torch.Tensor | TokenCondition) -> torch.Tensor | TokenCondition:
        """The null condition of classifier-free guidance, the shape of ``cond``: all zeros; for a
        :class:`TokenCondition` zero tokens whose mask keeps position 0 only, and a zero pooled vector."""
        return cond.null() if isinstance(cond, TokenCondition) else torch.zeros_like(cond)

    def prepare(self, stage: str, batch: Mapping[str, torch.Tensor], device="cpu") -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def build_trainer(self, stage: str) -> nn.Module:
        raise NotImplementedError

    def trainer_module(self, stage: str) -> nn.Module:
        if stage not in self.stages:
            raise GeneratorError(f"stage: {stage!r} is not a stage of {self.name} ({list(self.stages)})")
        if stage not in self._trainers:
            self._trainers[stage] = self.build_trainer(stage)
        return self._trainers[stage].train().requires_grad_(True)

    def loss(self, stage: str, batch: Mapping[str, torch.Tensor], device="cpu") -> torch.Tensor:
        """The stage's training loss on a raw table batch (single-process convenience)."""
        return self.trainer_module(stage)(**self.prepare(stage, batch, device))

    def fit_latent_scale(self, weights: torch.Tensor) -> float:
        """1 / std of the first-stage latents of ``weights`` [N, num_blocks*block_size] (raw), so the
        latent DDPM sees unit-scale data (the LDM "scaling factor")."""
        raise GeneratorError(f"method {self.name} has no latent space")

    # ------------------------------------------------------------------ sampling
    def _denoise(self, fn, x: torch.Tensor, mode: str, t: int, steps: int, eta: float,
                 gen: torch.Generator) -> torch.Tensor:
        return denoise(fn, x, self.scheduler, mode, t, steps, eta, gen)

    def sample(self, conditions: Sequence[str | None] | str | None = None, num_samples: int = 1,
               mode: str = "one_step", t: int = 500, steps: int = 50, eta: float = 0.0, seed: int = 0,
               device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               chunk_blocks: int = 0, guidance_scale: float = 1.0) -> torch.Tensor:
        """Normalised weight blocks ``[len(conditions) * num_samples, num_blocks, block_size]``,
        condition-major (rows ``i*num_samples .. (i+1)*num_samples-1`` belong to ``conditions[i]``).

        ``mode``: ``one_step`` (direct recovery at timestep ``t``, eq. 3), ``ddim`` (``steps``
        steps, ``eta``) or ``ddpm`` (``steps`` steps).  ``conditions``: a prompt / dataset name per
        entry (unknown ones are encoded with the frozen encoder), or ``None`` for unconditional
        methods.  ``chunk_blocks`` caps rows per forward for block-wise methods (0 = all blocks
        of all samples of a condition in one batched forward).  ``guidance_scale``: classifier-free
        guidance weight s (model output ``out_null + s * (out_cond - out_null)``; 1 = off, 0 = the
        null condition; needs a generator trained with ``cond_dropout`` > 0).  Undo normalisation with
        ``self.layout.denormalize`` and reassemble with ``self.layout.detokenize``."""
        if conditions is None or isinstance(conditions, str):
            conditions = [conditions]
        conditions = list(conditions)
        if num_samples < 1:
            raise GeneratorError("num_samples: must be >= 1")
        self.check_guidance(guidance_scale)
        if self.conditioning is None and any(c is not None for c in conditions):
            log.warning("%s is unconditional: conditions %s only set how many sample groups are drawn",
                        self.name, conditions[:3])
        device = torch.device(device)
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        emb = self.encode_conditions(conditions, device) if self.conditioning else None
        outs = []
        for i, _ in enumerate(conditions):
            c = None if emb is None else emb[i]
            with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                outs.append(self._sample_one(c, num_samples, mode, t, steps, eta, gen, device, chunk_blocks,
                                             float(guidance_scale)).float().cpu())
        out = torch.cat(outs).view(-1, self.layout.num_blocks, self.layout.block_size)
        return out * self.layout.valid_mask

    def check_guidance(self, guidance_scale: float) -> None:
        """Refuse a guidance scale this generator cannot sample with (a GeneratorError naming it)."""
        if guidance_scale < 0:
            raise GeneratorError(f"guidance_scale: must be >= 0, got {guidance_scale}")
        if guidance_scale == 1.0:
            return
        if self.conditioning is None:
            raise GeneratorError(f"guidance_scale: method {self.name} is unconditional (use 1.0)")
        if self.cond_dropout == 0:
            raise GeneratorError(f"guidance_scale: {guidance_scale} needs a generator trained with cond_dropout > 0 "
                                 "(this one never saw the null condition; use 1.0)")

    def _guided(self, fn, cond: torch.Tensor | None, scale: float):
        """``fn(x, t, cond) -> out`` as the ``fn(x, t)`` that :func:`denoise` runs, guided by ``scale``."""
        if cond is None:
            return lambda x, tt: fn(x, tt, None)
        return guided(fn, cond, self.null_condition(cond), scale)

    def _sample_one(self, cond, n, mode, t, steps, eta, gen, device, chunk_blocks, guidance_scale) -> torch.Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ persistence
    def to_state(self) -> GeneratorState:
        """Everything but the model weights (for the Ray Train workers; the export writes the same)."""
        return GeneratorState(
            method=self.name, layout=self.layout, preset=self.preset, model_overrides=self.model_overrides,
            model_configs=self.model_configs, scheduler=self.scheduler, condition_names=self.condition_names,
            conditions=self.conditions, text_encoder=self.text_encoder_name, dataset_options=self.dataset_options,
            latent_scale=self.latent_scale, data_stats=dict(self.data_stats), pretrained=self.pretrained,
            features_bank=self.features_bank, cond_dropout=self.cond_dropout)

    @classmethod
    def from_state(cls, state: GeneratorState, models: Mapping[str, nn.Module] | None = None) -> "GeneratorMethod":
        """The method ``state.method`` (any registered method, whatever class this is called on)."""
        if state.method not in METHODS:
            raise GeneratorError(f"method: unknown method {state.method!r} (known: {sorted(METHODS)})")
        m = METHODS[state.method](
            state.layout, state.preset, model_overrides=state.model_overrides, scheduler=state.scheduler,
            condition_names=state.condition_names, conditions=state.conditions, text_encoder=state.text_encoder,
            dataset_options=state.dataset_options, latent_scale=state.latent_scale, pretrained=state.pretrained,
            cond_dropout=state.cond_dropout, models=models, model_configs=state.model_configs)
        m.features_bank = state.features_bank
        m.data_stats = dict(state.data_stats)
        return m

    def save_pretrained(self, path: str, models: Sequence[str] | None = None) -> None:
        """Write one ``save_pretrained`` folder per model, ``scheduler/`` and the :class:`GeneratorState`
        files (``generator.json`` last), to a local folder or an ``s3://`` URI."""
        keys = list(models) if models is not None else [k for k in self.model_class
                                                        if k in self.models or k in self.pretrained]
        loc = resolve(path)
        with tempfile.TemporaryDirectory(prefix="rw-export-") as tmp:
            out = tmp if loc.is_s3 else loc.path
            os.makedirs(out, exist_ok=True)
            for k in keys:
                self.model(k).save_pretrained(os.path.join(out, k), safe_serialization=True)
            make_scheduler(self.scheduler).save_pretrained(os.path.join(out, "scheduler"))
            self.to_state().write(out, models={k: type(self.model(k)).__name__ for k in keys},
                                  parameters={k: count_parameters(self.model(k)) for k in keys},
                                  conditioning=self.conditioning)
            if loc.is_s3:
                upload_dir(tmp, path)
