"""Method objects: one uniform interface over the three weight generators.

A method owns its models (diffusers ``ModelMixin``s), the zoo layout *with* its per-group
normalisation stats, the diffusers noise schedule and the condition encoders/cache, and offers:

* ``stages``: the training stages in order, each training one model (``stage_model``) on one
  table unit (``stage_unit``: ``"block"`` rows or whole ``"checkpoint"`` vectors);
* ``prepare(stage, batch)``: a raw table batch (``block``/``block_index`` or ``weights``, plus
  ``cond_id``) -> normalised model inputs, with frozen earlier-stage encoders applied;
* ``trainer_module(stage)``: the ``nn.Module`` whose ``forward(**prepared)`` returns the stage loss
  (what DeepSpeed wraps); ``loss(stage, batch)`` = both in one call;
* ``sample(conditions, num_samples, mode=..., ...)``: normalised weight blocks
  ``[len(conditions) * num_samples, num_blocks, block_size]`` (padding exactly 0);
* ``save_pretrained(path)`` / :func:`load_generator` (local folder or ``s3://``).

| method | stages (model) | unit | condition |
|---|---|---|---|
| ``denoised_weights`` | diffusion (BlockUNet1D) | block | text prompt (frozen text encoder, cached) + block index |
| ``pdiff`` | autoencoder (PDiffAutoencoder), diffusion (LatentDenoiser1D) | checkpoint | none |
| ``d2nwg`` | vae (WeightVAE), dataset_encoder (SetTransformer), diffusion (LatentDenoiser1D) | checkpoint | dataset (Set Transformer) |
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, ClassVar, Mapping, Sequence

import torch
from torch import nn

from ..blocks import LayoutError, WeightLayout
from ..conditioning import (ConditionCache, ConditioningError, SetTransformer, TextEncoder, clip_contrastive_loss,
                            dataset_features)
from .block_unet import BlockUNet1D
from .latent_denoiser import LatentDenoiser1D
from .pdiff import PDiffAutoencoder
from .presets import get_preset
from .vae import WeightVAE

__all__ = ["GeneratorMethod", "DenoisedWeights", "PDiff", "D2NWG", "METHODS", "build_method", "load_generator",
           "GeneratorError", "GeneratorSampler", "sampler_loader", "SCHEDULER_DEFAULTS", "FORMAT_VERSION",
           "count_parameters", "one_step_recover"]

log = logging.getLogger(__name__)

FORMAT_VERSION = "rayweights.generator/1"
GENERATOR_FILE = "generator.json"
DATA_STATS_FILE = "data_stats.safetensors"
SCHEDULER_DEFAULTS = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=2e-2,
                          prediction_type="epsilon", clip_sample=False)
MODEL_CLASSES = {c.__name__: c for c in (BlockUNet1D, PDiffAutoencoder, LatentDenoiser1D, WeightVAE, SetTransformer)}


class GeneratorError(ValueError):
    """A generator cannot be built, trained on this table, or loaded (the message names why)."""


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def one_step_recover(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar_t: float,
                     prediction_type: str = "epsilon") -> torch.Tensor:
    """Denoised Weights eq. 3, direct recovery from one forward at t (``rayweights.sampling.one_step_recover``:
    epsilon, v_prediction or sample outputs); an unknown ``prediction_type`` is a GeneratorError."""
    from ..sampling import SamplingError
    from ..sampling import one_step_recover as recover

    try:
        return recover(x_t, eps, alpha_bar_t, prediction_type)
    except SamplingError as exc:
        raise GeneratorError(f"scheduler.prediction_type: {exc}") from None


# ----------------------------------------------------------------------------- stage losses
class EpsilonLoss(nn.Module):
    """Eq. 1 (and p-diff/D2NWG's latent DDPM objective): ||eps_theta(x_t, t, ...) - eps||^2 with
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps from diffusers' DDPMScheduler.add_noise, t ~ U[0, T)."""

    def __init__(self, denoiser: nn.Module, scheduler_config: Mapping[str, Any], blockwise: bool):
        super().__init__()
        from diffusers import DDPMScheduler

        self.denoiser, self.blockwise = denoiser, blockwise
        self.scheduler = DDPMScheduler(**scheduler_config)     # not a module: no buffers cast to bf16

    def forward(self, x0: torch.Tensor, cond: torch.Tensor | None = None, block_index: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x0 = x0.float()
        B = x0.shape[0]
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (B,), device=x0.device)
        noise = torch.randn_like(x0)
        x_t = self.scheduler.add_noise(x0, noise, t)
        if self.blockwise:
            pred = self.denoiser(x_t, t, block_index, cond)
        else:
            pred = self.denoiser(x_t, t, cond)
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            target = noise
        elif kind == "v_prediction":
            target = self.scheduler.get_velocity(x0, noise, t)
        elif kind == "sample":
            target = x0
        else:
            raise GeneratorError(f"scheduler.prediction_type: {kind!r} is not epsilon, v_prediction or sample")
        err = (pred.float() - target) ** 2
        if mask is not None:
            m = mask.to(err.dtype)
            return (err * m).sum() / m.sum().clamp_min(1.0)
        return err.mean()


class ReconstructionLoss(nn.Module):
    """p-diff autoencoder: MSE over real weights of dec(enc(x + xi_in) + xi_lat) vs x."""

    def __init__(self, autoencoder: PDiffAutoencoder):
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, x0: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        err = (self.autoencoder(x0, noise=True).float() - x0.float()) ** 2
        if mask is not None:
            m = mask.to(err.dtype).expand_as(err)
            return (err * m).sum() / m.sum().clamp_min(1.0)
        return err.mean()


class VAELoss(nn.Module):
    def __init__(self, vae: WeightVAE):
        super().__init__()
        self.vae = vae

    def forward(self, x0: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.vae.loss(x0, None if mask is None else mask.expand_as(x0))[0]


class ContrastiveLoss(nn.Module):
    """D2NWG eq. 2: align Set Transformer dataset embeddings with (projected) VAE weight latents."""

    def __init__(self, encoder: SetTransformer):
        super().__init__()
        self.encoder = encoder

    def forward(self, latents: torch.Tensor, features: torch.Tensor, cond_ids: torch.Tensor) -> torch.Tensor:
        zw = self.encoder.embed_weights(latents)
        zd = self.encoder(features)
        return clip_contrastive_loss(zw, zd, cond_ids, self.encoder.logit_scale)


# ----------------------------------------------------------------------------- the base class
class GeneratorMethod:
    name: ClassVar[str] = ""
    stages: ClassVar[tuple[str, ...]] = ()
    stage_model: ClassVar[dict[str, str]] = {}
    stage_unit: ClassVar[dict[str, str]] = {}
    model_class: ClassVar[dict[str, type]] = {}
    conditioning: ClassVar[str | None] = None        # "text" | "dataset" | None

    def __init__(self, layout: WeightLayout, preset: str = "tiny", model_overrides: Mapping[str, Mapping] | None = None,
                 scheduler: Mapping[str, Any] | None = None, condition_names: Sequence[str] | None = None,
                 conditions: ConditionCache | None = None, text_encoder: str | None = None,
                 dataset_options: Mapping[str, Any] | None = None, latent_scale: float | None = None,
                 pretrained: Mapping[str, str] | None = None, models: Mapping[str, nn.Module] | None = None,
                 model_configs: Mapping[str, Mapping] | None = None):
        if not isinstance(layout, WeightLayout):
            raise GeneratorError(f"layout: expected a WeightLayout, got {type(layout).__name__}")
        if not layout.has_stats:
            raise GeneratorError("layout: no per-group normalisation stats (fit them with layout.fit_stats)")
        self.layout, self.preset = layout, preset
        base = get_preset(self.name, preset)
        overrides = {k: dict(v) for k, v in (model_overrides or {}).items()}
        unknown = sorted(set(overrides) - set(base))
        if unknown:
            raise GeneratorError(f"model: unknown model(s) {unknown} for method {self.name} (has {sorted(base)})")
        self.model_overrides = overrides
        if model_configs is not None:                 # a saved generator: configs exactly as trained
            self.model_configs = {k: dict(v) for k, v in model_configs.items()}
        else:
            self.model_configs = {k: {**base[k], **overrides.get(k, {})} for k in base}
        self.scheduler_config = {**SCHEDULER_DEFAULTS, **dict(scheduler or {})}
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
        self._checked = False
        self.check_layout()

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

    def condition_table(self, device) -> torch.Tensor:
        if self.conditions is None:
            raise GeneratorError(f"method {self.name}: no condition embeddings (build the condition cache first)")
        return self.conditions.embeddings.to(device)

    def encode_conditions(self, conditions: Sequence[str | None], device="cpu") -> torch.Tensor | None:
        """Embeddings [n, D] for conditions (the cache, else the frozen encoder); None if unconditioned."""
        if self.conditioning is None:
            return None
        if any(c is None for c in conditions):
            raise GeneratorError(f"method {self.name} is {self.conditioning}-conditioned: a condition is required")
        missing = [c for c in dict.fromkeys(conditions) if self.conditions is None or c not in self.conditions]
        if missing:
            emb = self._encode_new(missing)
            if self.conditions is None:
                self.conditions = ConditionCache(missing, emb, self.conditioning, self._encoder_name())
            else:
                self.conditions.extend(missing, emb)
        return self.conditions.lookup(conditions).to(device)

    def _encode_new(self, conditions: list[str]) -> torch.Tensor:
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

    def _cond(self, batch, device) -> torch.Tensor:
        if "cond_id" not in batch:
            raise GeneratorError(f"method {self.name}: batch has no 'cond_id' column")
        ids = batch["cond_id"].to(device).long()
        if bool((ids < 0).any()):
            raise GeneratorError("batch: a row's condition is not in the condition cache")
        return self.condition_table(device)[ids]

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
    def _scheduler(self, mode: str):
        from diffusers import DDIMScheduler, DDPMScheduler

        base = DDPMScheduler(**self.scheduler_config)
        if mode == "ddim":
            return DDIMScheduler.from_config(base.config)
        return base

    def _denoise(self, fn, x: torch.Tensor, mode: str, t: int, steps: int, eta: float,
                 gen: torch.Generator) -> torch.Tensor:
        """Run ``fn(x_t, timesteps) -> eps`` from pure noise ``x`` to x0 with a diffusers scheduler."""
        sched = self._scheduler(mode)
        T = sched.config.num_train_timesteps
        if mode == "one_step":
            if not 0 <= t < T:
                raise GeneratorError(f"t: {t} is outside [0, {T})")
            tt = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
            return one_step_recover(x, fn(x, tt).float(), float(sched.alphas_cumprod[int(t)]),
                                    sched.config.prediction_type)
        if mode not in ("ddim", "ddpm"):
            raise GeneratorError(f"mode: {mode!r} is not one_step, ddim or ddpm")
        if not 1 <= steps <= T:
            raise GeneratorError(f"steps: {steps} is outside [1, {T}]")
        sched.set_timesteps(steps, device=x.device)
        for st in sched.timesteps:
            tt = torch.full((x.shape[0],), int(st), dtype=torch.long, device=x.device)
            eps = fn(x, tt).float()
            kw = {"eta": eta} if mode == "ddim" else {}
            x = sched.step(eps, int(st), x, generator=gen, **kw).prev_sample
        return x

    def sample(self, conditions: Sequence[str | None] | str | None = None, num_samples: int = 1,
               mode: str = "one_step", t: int = 500, steps: int = 50, eta: float = 0.0, seed: int = 0,
               device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               chunk_blocks: int = 0) -> torch.Tensor:
        """Normalised weight blocks ``[len(conditions) * num_samples, num_blocks, block_size]``,
        condition-major (rows ``i*num_samples .. (i+1)*num_samples-1`` belong to ``conditions[i]``).

        ``mode``: ``one_step`` (direct recovery at timestep ``t``, eq. 3), ``ddim`` (``steps``
        steps, ``eta``) or ``ddpm`` (``steps`` steps).  ``conditions``: a prompt / dataset name per
        entry (unknown ones are encoded with the frozen encoder), or ``None`` for unconditional
        methods.  ``chunk_blocks`` caps rows per forward for block-wise methods (0 = all blocks
        of all samples of a condition in one batched forward).  Undo normalisation with
        ``self.layout.denormalize`` and reassemble with ``self.layout.detokenize``."""
        if conditions is None or isinstance(conditions, str):
            conditions = [conditions]
        conditions = list(conditions)
        if num_samples < 1:
            raise GeneratorError("num_samples: must be >= 1")
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
                outs.append(self._sample_one(c, num_samples, mode, t, steps, eta, gen, device, chunk_blocks).float().cpu())
        out = torch.cat(outs).view(-1, self.layout.num_blocks, self.layout.block_size)
        return out * self.layout.valid_mask

    def _sample_one(self, cond, n, mode, t, steps, eta, gen, device, chunk_blocks) -> torch.Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ persistence
    def to_state(self) -> dict:
        """Everything but the model weights (JSON-able, plus tensors for the condition cache)."""
        return {
            "method": self.name, "preset": self.preset, "layout": self.layout.to_json(),
            "model_overrides": self.model_overrides, "model_configs": self.model_configs,
            "scheduler": self.scheduler_config, "condition_names": self.condition_names,
            "conditions": None if self.conditions is None else self.conditions.to_bytes(),
            "text_encoder": self.text_encoder_name, "dataset_options": self.dataset_options,
            "latent_scale": self.latent_scale, "pretrained": self.pretrained,
            "features_bank": self.features_bank, "data_stats": dict(self.data_stats),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> "GeneratorMethod":
        klass = METHODS[state["method"]]
        cache = None if state.get("conditions") is None else ConditionCache.from_bytes(state["conditions"])
        m = klass(WeightLayout.from_json(state["layout"]), state["preset"], state.get("model_overrides"),
                  state.get("scheduler"), state.get("condition_names"), cache, state.get("text_encoder"),
                  state.get("dataset_options"), state.get("latent_scale"), state.get("pretrained"),
                  model_configs=state.get("model_configs"))
        m.features_bank = state.get("features_bank")
        m.data_stats = dict(state.get("data_stats") or {})
        return m

    def save_pretrained(self, path: str, models: Sequence[str] | None = None) -> None:
        """Write ``generator.json``, ``layout.json`` (with stats), ``scheduler/``, the condition
        cache and one ``save_pretrained`` folder per model, to a local folder or an ``s3://`` URI."""
        import tempfile

        from diffusers import DDPMScheduler

        from ..storage import resolve
        from .io import upload_dir

        keys = list(models) if models is not None else [k for k in self.model_class if k in self.models or k in self.pretrained]
        loc = resolve(path)
        with tempfile.TemporaryDirectory(prefix="rw-export-") as tmp:
            out = tmp if loc.is_s3 else loc.path
            os.makedirs(out, exist_ok=True)
            for k in keys:
                self.model(k).save_pretrained(os.path.join(out, k), safe_serialization=True)
            DDPMScheduler(**self.scheduler_config).save_pretrained(os.path.join(out, "scheduler"))
            with open(os.path.join(out, "layout.json"), "w") as f:
                f.write(self.layout.to_json())
            if self.conditions is not None:
                with open(os.path.join(out, ConditionCache.FILE), "wb") as f:
                    f.write(self.conditions.to_bytes())
            if self.data_stats:
                from safetensors.torch import save_file

                save_file({k: v.detach().float().contiguous().cpu() for k, v in self.data_stats.items()},
                          os.path.join(out, DATA_STATS_FILE))
            meta = {
                "format_version": FORMAT_VERSION, "method": self.name, "preset": self.preset,
                "models": {k: type(self.model(k)).__name__ for k in keys},
                "model_overrides": self.model_overrides, "scheduler": self.scheduler_config,
                "conditioning": self.conditioning, "condition_names": self.condition_names,
                "text_encoder": self.text_encoder_name, "dataset_options": self.dataset_options,
                "latent_scale": self.latent_scale, "num_blocks": self.layout.num_blocks,
                "block_size": self.layout.block_size,
                "parameters": {k: count_parameters(self.model(k)) for k in keys},
            }
            with open(os.path.join(out, GENERATOR_FILE), "w") as f:
                json.dump(meta, f, indent=1)
            if loc.is_s3:
                upload_dir(tmp, path)


class DenoisedWeights(GeneratorMethod):
    """Denoised Neural Weights: BlockUNet1D over (block, block index, text prompt) rows."""

    name = "denoised_weights"
    stages = ("diffusion",)
    stage_model = {"diffusion": "denoiser"}
    stage_unit = {"diffusion": "block"}
    model_class = {"denoiser": BlockUNet1D}
    conditioning = "text"

    def check_layout(self):
        self._fill("denoiser", "block_size", self.layout.block_size, "the table's block_size")
        if self.conditions is not None:
            self._fill("denoiser", "cross_attention_dim", self.conditions.dim, "the text embedding width")

    def model_config(self, key):
        cfg = dict(self.model_configs[key])
        if cfg.get("cross_attention_dim") is None:
            cfg["cross_attention_dim"] = self.conditions.dim if self.conditions is not None else self.text_encoder.dim
            self.model_configs[key]["cross_attention_dim"] = cfg["cross_attention_dim"]
        return cfg

    def _encoder_name(self):
        return self.text_encoder.name_or_path

    def _encode_new(self, conditions):
        return self.text_encoder.encode(conditions)

    def prepare(self, stage, batch, device="cpu"):
        out = self._normalized(stage, batch, device)
        # the noise is predicted on every position, padding included: padded positions are x0 = 0,
        # and an untrained prediction there would feed garbage back through the UNet while sampling
        out.pop("mask")
        out["cond"] = self._cond(batch, device)
        return out

    def build_trainer(self, stage):
        return EpsilonLoss(self.model("denoiser"), self.scheduler_config, blockwise=True)

    def _sample_one(self, cond, n, mode, t, steps, eta, gen, device, chunk_blocks):
        L = self.layout
        model = self.frozen("denoiser", device)
        nb, bs = L.num_blocks, L.block_size
        noise = torch.randn(n * nb, bs, generator=gen).to(device)
        bidx = torch.arange(nb, device=device).repeat(n)
        rows = n * nb if chunk_blocks <= 0 else chunk_blocks
        out = []
        for s in range(0, n * nb, rows):
            b = bidx[s:s + rows]
            c = None if cond is None else cond.view(1, -1).expand(b.shape[0], -1)
            out.append(self._denoise(lambda x, tt: model(x, tt, b, c), noise[s:s + rows], mode, t, steps, eta, gen))
        return torch.cat(out).view(n, nb, bs)


class _LatentMethod(GeneratorMethod):
    first_stage: ClassVar[str] = ""

    def _latents(self, x0: torch.Tensor, device, sample_posterior: bool) -> torch.Tensor:
        raise NotImplementedError

    def _decode(self, z: torch.Tensor, device) -> torch.Tensor:
        raise NotImplementedError

    def latent_shape(self) -> tuple[int, int]:
        raise NotImplementedError

    @torch.no_grad()
    def fit_latent_scale(self, weights: torch.Tensor, device="cpu") -> float:
        L = self.layout
        x0 = L.normalize(weights.float().view(-1, L.num_blocks, L.block_size)).view(weights.shape[0], -1)
        z = self._latents(x0.to(device), device, sample_posterior=False)
        std = float(z.float().std())
        self.latent_scale = 1.0 / max(std, 1e-6)
        return self.latent_scale

    @torch.no_grad()
    def reconstruct(self, weights: torch.Tensor, device="cpu") -> torch.Tensor:
        """Raw weights [N, num_blocks*block_size] -> the first stage's reconstruction dec(enc(x)) (raw,
        posterior mean, no noise augmentation): the autoencoder/VAE check of the diagnostics."""
        L = self.layout
        w = weights.float().reshape(-1, L.num_blocks, L.block_size)
        z = self._latents(L.normalize(w).reshape(w.shape[0], -1).to(device), device, sample_posterior=False)
        x = self._decode(z, device).float().cpu().reshape(-1, L.num_blocks, L.block_size)
        return L.denormalize(x).reshape(w.shape[0], -1)

    def _scaled_latents(self, x0, device, sample_posterior=True):
        if self.latent_scale is None:
            raise GeneratorError(f"method {self.name}: latent_scale is not fitted (train the first stage first)")
        with torch.no_grad():
            return self._latents(x0, device, sample_posterior) * self.latent_scale

    def _sample_one(self, cond, n, mode, t, steps, eta, gen, device, chunk_blocks):
        if self.latent_scale is None:
            raise GeneratorError(f"method {self.name}: latent_scale is missing from the generator")
        den = self.frozen("denoiser", device)
        zc, zl = self.latent_shape()
        z = torch.randn(n, zc, zl, generator=gen).to(device)
        c = None if cond is None else cond.view(1, -1).expand(n, -1)
        z0 = self._denoise(lambda x, tt: den(x, tt, c), z, mode, t, steps, eta, gen)
        return self._decode(z0.float() / self.latent_scale, device).view(n, self.layout.num_blocks, self.layout.block_size)


class PDiff(_LatentMethod):
    """p-diff: 1-D CNN autoencoder with noise augmentation, then a DDPM on its latents."""

    name = "pdiff"
    stages = ("autoencoder", "diffusion")
    stage_model = {"autoencoder": "autoencoder", "diffusion": "denoiser"}
    stage_unit = {"autoencoder": "checkpoint", "diffusion": "checkpoint"}
    model_class = {"autoencoder": PDiffAutoencoder, "denoiser": LatentDenoiser1D}
    conditioning = None
    first_stage = "autoencoder"

    def latent_shape(self):
        a = self.model_configs["autoencoder"]
        fold = a.get("fold", 2)
        return (a.get("latent_channels", 4), max(2, -(-self.flat_dim // fold ** 4)))

    def check_layout(self):
        self._fill("autoencoder", "in_dim", self.flat_dim, "the table's flattened length (num_blocks x block_size)")
        zc, zl = self.latent_shape()
        self._fill("denoiser", "latent_channels", zc, "the autoencoder's latent channels")
        self._fill("denoiser", "latent_length", zl, "the autoencoder's latent length")
        self.model_configs["denoiser"].setdefault("cond_dim", 0)

    # p-diff's zoo is a few members' densely saved checkpoints: in per-group normalised space they
    # sit within ~1e-2 of one common vector.  Two standardisations make that spread visible to the
    # models (both fitted by the trainer, stored in data_stats, absent = identity for old exports):
    # * inputs: per-coordinate mean/std over the zoo, so the autoencoder (and its 1e-3 input /
    #   1e-1 latent noise augmentation) works on the checkpoints' differences at unit scale;
    # * latents: per-coordinate mean removed and one scale factor (1 / std of the centred latents,
    #   the latent-diffusion "scaling factor"), so the DDPM sees zero-mean, unit-variance data.
    @torch.no_grad()
    def fit_input_stats(self, weights: torch.Tensor, eps: float = 1e-6) -> dict[str, torch.Tensor]:
        """Per-coordinate mean/std of the layout-normalised ``weights`` [N, num_blocks*block_size] (raw)."""
        L = self.layout
        x0 = L.normalize(weights.float().reshape(-1, L.num_blocks, L.block_size)).reshape(weights.shape[0], -1)
        mask = L.valid_mask.reshape(-1).float()
        std = x0.double().std(0, unbiased=False).float().clamp_min(eps) if x0.shape[0] > 1 else torch.ones_like(mask)
        self.data_stats.update(input_mean=x0.double().mean(0).float() * mask, input_std=torch.where(mask > 0, std, 1.0))
        self.data_stats.pop("latent_mean", None)           # latents of another input space
        return self.data_stats

    def _standardize(self, x0: torch.Tensor) -> torch.Tensor:
        if "input_mean" not in self.data_stats:
            return x0
        m, s = (self.data_stats[k].to(x0.device, x0.dtype) for k in ("input_mean", "input_std"))
        return (x0 - m) / s * (s > 0)

    def _unstandardize(self, x: torch.Tensor) -> torch.Tensor:
        if "input_mean" not in self.data_stats:
            return x
        m, s = (self.data_stats[k].to(x.device, x.dtype) for k in ("input_mean", "input_std"))
        return x * s + m

    def _latents(self, x0, device, sample_posterior):
        z = self.frozen("autoencoder", device).encode(self._standardize(x0), noise=False)
        if "latent_mean" in self.data_stats:
            z = z - self.data_stats["latent_mean"].to(z.device, z.dtype)
        return z

    def _decode(self, z, device):
        if "latent_mean" in self.data_stats:
            z = z + self.data_stats["latent_mean"].to(z.device, z.dtype)
        return self._unstandardize(self.frozen("autoencoder", device).decode(z))

    @torch.no_grad()
    def fit_latent_scale(self, weights: torch.Tensor, device="cpu") -> float:
        """Latent mean per coordinate and 1 / std of the centred latents of ``weights`` (raw)."""
        L = self.layout
        self.data_stats.pop("latent_mean", None)
        x0 = L.normalize(weights.float().view(-1, L.num_blocks, L.block_size)).view(weights.shape[0], -1)
        z = self._latents(x0.to(device), device, sample_posterior=False).float().cpu()
        self.data_stats["latent_mean"] = z.mean(0)
        std = float((z - z.mean(0)).std()) if z.shape[0] > 1 else 1.0
        self.latent_scale = 1.0 / max(std, 1e-6)
        return self.latent_scale

    def prepare(self, stage, batch, device="cpu"):
        out = self._normalized(stage, batch, device)
        if stage == "diffusion":
            return {"x0": self._scaled_latents(out["x0"], device)}
        out["x0"] = self._standardize(out["x0"])
        return out

    def build_trainer(self, stage):
        if stage == "autoencoder":
            return ReconstructionLoss(self.model("autoencoder"))
        return EpsilonLoss(self.model("denoiser"), self.scheduler_config, blockwise=False)


class D2NWG(_LatentMethod):
    """D2NWG: VAE, Set Transformer dataset encoder (contrastive), dataset-conditioned latent DDPM."""

    name = "d2nwg"
    stages = ("vae", "dataset_encoder", "diffusion")
    stage_model = {"vae": "vae", "dataset_encoder": "dataset_encoder", "diffusion": "denoiser"}
    stage_unit = {"vae": "checkpoint", "dataset_encoder": "checkpoint", "diffusion": "checkpoint"}
    model_class = {"vae": WeightVAE, "dataset_encoder": SetTransformer, "denoiser": LatentDenoiser1D}
    conditioning = "dataset"
    first_stage = "vae"

    def latent_shape(self):
        v = self.model_configs["vae"]
        levels = len(v.get("hidden_channels", (32, 64, 128)))
        return (v.get("latent_channels", 4), v.get("adapter_length", 64) // 2 ** (levels - 1))

    def check_layout(self):
        self._fill("vae", "in_dim", self.flat_dim, "the table's flattened length (num_blocks x block_size)")
        zc, zl = self.latent_shape()
        self._fill("dataset_encoder", "weight_dim", zc * zl, "the VAE latent size")
        self._fill("denoiser", "latent_channels", zc, "the VAE's latent channels")
        self._fill("denoiser", "latent_length", zl, "the VAE's latent length")
        self._fill("denoiser", "cond_dim", self.model_configs["dataset_encoder"].get("out_dim", 128),
                   "the dataset embedding width")
        if "feature_dim" in self.dataset_options:
            self._fill("dataset_encoder", "in_dim", int(self.dataset_options["feature_dim"]),
                       "the dataset feature width")

    def _encoder_name(self):
        return "SetTransformer"

    def features(self, conditions: Sequence[str], seed: int | None = None) -> torch.Tensor:
        """Per-class feature sets [n, C, K, d] of the datasets the conditions name."""
        k = int(self.dataset_options["samples_per_class"])
        s = int(self.dataset_options["seed"] if seed is None else seed)
        spec = self.dataset_options.get("zoo_spec")
        feats = [dataset_features(c, k, s, spec) for c in conditions]
        shapes = {tuple(f.shape) for f in feats}
        if len(shapes) > 1:
            raise ConditioningError(f"dataset features differ in shape across conditions: {sorted(shapes)[:3]} "
                                    "(every dataset needs the same number of classes and samples per class)")
        return torch.stack(feats)

    def build_features_bank(self) -> torch.Tensor:
        if not self.condition_names:
            raise GeneratorError("d2nwg: the table has no conditions (dataset names) to encode")
        self.features_bank = self.features(self.condition_names)
        self.dataset_options["feature_dim"] = int(self.features_bank.shape[-1])
        self.check_layout()
        return self.features_bank

    @torch.no_grad()
    def _encode_new(self, conditions):
        enc = self.frozen("dataset_encoder", "cpu")
        return enc(self.features(conditions)).float()

    def build_condition_cache(self) -> ConditionCache:
        """After the dataset-encoder stage: embed every zoo condition once with the frozen encoder."""
        if self.features_bank is None:
            self.build_features_bank()
        with torch.no_grad():
            emb = self.frozen("dataset_encoder", "cpu")(self.features_bank).float()
        self.conditions = ConditionCache(self.condition_names, emb, "dataset", "SetTransformer")
        return self.conditions

    def _latents(self, x0, device, sample_posterior):
        mean, logvar = self.frozen("vae", device).encode(x0)
        return mean + torch.randn_like(mean) * (0.5 * logvar).exp() if sample_posterior else mean

    def _decode(self, z, device):
        return self.frozen("vae", device).decode(z)

    def prepare(self, stage, batch, device="cpu"):
        out = self._normalized(stage, batch, device)
        if stage == "vae":
            return out
        if stage == "dataset_encoder":
            if self.features_bank is None:
                raise GeneratorError("d2nwg: no dataset features bank (build_features_bank first)")
            ids = batch["cond_id"].to(device).long()
            if bool((ids < 0).any()):
                raise GeneratorError("batch: a row's condition is not among the table's conditions")
            uniq, inv = torch.unique(ids, return_inverse=True)
            with torch.no_grad():
                lat = self._latents(out["x0"], device, sample_posterior=False)
            return {"latents": lat, "features": self.features_bank[uniq.cpu()].to(device), "cond_ids": inv}
        return {"x0": self._scaled_latents(out["x0"], device), "cond": self._cond(batch, device)}

    def build_trainer(self, stage):
        if stage == "vae":
            return VAELoss(self.model("vae"))
        if stage == "dataset_encoder":
            return ContrastiveLoss(self.model("dataset_encoder"))
        return EpsilonLoss(self.model("denoiser"), self.scheduler_config, blockwise=False)


METHODS: dict[str, type[GeneratorMethod]] = {m.name: m for m in (DenoisedWeights, PDiff, D2NWG)}


def build_method(name: str, layout: WeightLayout, preset: str = "tiny", **kwargs) -> GeneratorMethod:
    if name not in METHODS:
        raise GeneratorError(f"method: unknown method {name!r} (known: {sorted(METHODS)})")
    return METHODS[name](layout, preset, **kwargs)


# ----------------------------------------------------------------------------- loading
def load_model(uri: str, cls: type | None = None) -> nn.Module:
    """``cls.from_pretrained`` on a folder at a local path or URI (class from its config if None)."""
    from .io import local_copy

    try:
        with local_copy(uri) as d:
            if cls is None:
                with open(os.path.join(d, "config.json")) as f:
                    name = json.load(f).get("_class_name")
                if name not in MODEL_CLASSES:
                    raise GeneratorError(f"{uri}: unknown model class {name!r}")
                cls = MODEL_CLASSES[name]
            return cls.from_pretrained(d)
    except FileNotFoundError:
        raise GeneratorError(f"{uri}: no model folder") from None


def load_generator(uri: str) -> GeneratorMethod:
    """A trained generator from its export folder (local path or ``s3://``)."""
    from ..storage import StorageError, read_bytes, resolve
    from .io import local_copy

    root = resolve(uri)
    try:
        meta = json.loads(read_bytes(root.join(GENERATOR_FILE)))
        layout = WeightLayout.from_json(read_bytes(root.join("layout.json")))
    except FileNotFoundError:
        raise GeneratorError(f"{uri}: not a generator export ({GENERATOR_FILE} or layout.json missing)") from None
    except (json.JSONDecodeError, LayoutError, StorageError) as exc:
        raise GeneratorError(f"{uri}: unreadable generator export: {exc}") from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise GeneratorError(f"{uri}: format_version {meta.get('format_version')!r} is not {FORMAT_VERSION!r}")
    if meta.get("method") not in METHODS:
        raise GeneratorError(f"{uri}: unknown method {meta.get('method')!r}")
    klass = METHODS[meta["method"]]
    cache = None
    try:
        cache = ConditionCache.from_bytes(read_bytes(root.join(ConditionCache.FILE)), f"{uri}/{ConditionCache.FILE}")
    except FileNotFoundError:
        pass
    models = {}
    with local_copy(uri) as d:
        for key, cls_name in meta["models"].items():
            if cls_name not in MODEL_CLASSES:
                raise GeneratorError(f"{uri}: model {key} has unknown class {cls_name!r}")
            models[key] = MODEL_CLASSES[cls_name].from_pretrained(os.path.join(d, key)).eval()
    configs = {k: dict(m.config) for k, m in models.items()}
    for cfg in configs.values():
        for k in [k for k in cfg if k.startswith("_")]:
            cfg.pop(k)
    base = get_preset(klass.name, meta["preset"])
    for k in base:
        configs.setdefault(k, {**base[k], **meta.get("model_overrides", {}).get(k, {})})
    m = klass(layout, meta["preset"], meta.get("model_overrides"), meta.get("scheduler"),
              meta.get("condition_names"), cache, meta.get("text_encoder"), meta.get("dataset_options"),
              meta.get("latent_scale"), models=models, model_configs=configs)
    try:
        from safetensors.torch import load as st_load

        m.data_stats = dict(st_load(read_bytes(root.join(DATA_STATS_FILE))))
    except FileNotFoundError:
        pass                                   # exports from before data stats: identity
    return m


# ----------------------------------------------------------------------------- the sampler adapter
class GeneratorSampler:
    """``rayweights.evaluation.protocols.WeightSampler`` over a trained generator:
    ``sample(condition, n, seed) -> [n, num_blocks, block_size]`` in normalised space."""

    normalized = True

    def __init__(self, method: GeneratorMethod, mode: str = "one_step", t: int = 500, steps: int = 50,
                 eta: float = 0.0, chunk_blocks: int = 0, device: str = "auto", dtype: str = "float32"):
        self.method, self.mode, self.t, self.steps, self.eta = method, mode, int(t), int(steps), float(eta)
        self.chunk_blocks = int(chunk_blocks)
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   ("cpu" if device == "auto" else device))
        self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]

    @property
    def layout(self) -> WeightLayout:
        return self.method.layout

    def sample(self, condition: str | None, n: int, seed: int = 0) -> torch.Tensor:
        return self.method.sample([condition], n, mode=self.mode, t=self.t, steps=self.steps, eta=self.eta,
                                  seed=seed, device=self.device, dtype=self.dtype, chunk_blocks=self.chunk_blocks)


def sampler_loader(uri: str, method: str = "one_step", t: int = 500, steps: int = 50, chunk_blocks: int = 0,
                   device: str = "auto", dtype: str = "float32", layout: str | None = None, **_):
    """For ``rayweights.sampling.register_sampler_loader``: a GeneratorSampler if ``uri`` is a
    generator export, else None."""
    from ..storage import exists, resolve

    if not exists(resolve(uri).join(GENERATOR_FILE)):
        return None
    return GeneratorSampler(load_generator(uri), method, t, steps, 0.0, chunk_blocks, device, dtype)


def block_unet_denoiser(preset: str = "base", block_size: int = 256, cross_attention_dim: int | None = None):
    """(fn(x [B, bs], t [B], block_index [B], cond) -> eps, description, parameter count) for
    benchmarks: a freshly initialised BlockUNet1D of ``preset``."""
    cfg = get_preset("denoised_weights", preset)["denoiser"]
    cfg.update(block_size=block_size, cross_attention_dim=cross_attention_dim)
    model = BlockUNet1D(**cfg).eval()
    n = count_parameters(model)
    return (lambda x, t, b, c=None: model(x, t, b, c)), f"BlockUNet1D preset {preset} ({n / 1e6:.1f} M params)", n
