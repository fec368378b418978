"""Sample complete weight sets for conditions and reassemble them into safetensors state_dicts.

``sample-weights`` (``jobs/sample_weights.py``)::

    python jobs/sample_weights.py --config cfg.yaml --output runs/x/samples \\
        --set generator=runs/x/generator --set 'conditions=["digits:0,1,2"]' --set num_samples=10

For every condition (a text prompt, a dataset name or path, or nothing: ``num_samples``
unconditional draws) the generator produces ``num_samples`` weight sets, either by one-step direct
recovery at a timestep ``t`` (Denoised Neural Weights eq. 3) or by multi-step DDIM/DDPM, with all
blocks of a model in one batched forward (``chunk_blocks`` caps the blocks per forward to keep
memory flat).  Conditions are spread over a pool of sampler actors with Ray Data (one GPU each when
the cluster has GPUs).  Each weight set is reassembled with the zoo layout (per-group normalisation
undone with ``layout.denormalize``, then ``layout.detokenize``) and saved as a safetensors
state_dict of the layout's parameters, loadable into the target architecture
(:func:`rayweights.evaluation.protocols.load_layout_params`).  Output::

    <output>/layout.json                         the layout (with normalisation stats)
    <output>/samples/<condition-slug>/sample-00000.safetensors
    <output>/samples.json                        index, written last: condition, sample, file, seconds
    <output>/table/...                           optional weight-block table of the samples (ZooWriter)

Samplers (all implement :class:`rayweights.evaluation.protocols.WeightSampler`):

* :class:`DiffusionBlockSampler` — a block-wise epsilon/v/x0-predicting denoiser with a diffusers
  scheduler: one-step direct recovery or DDIM/DDPM, all blocks batched;
* :class:`GaussianWeightSampler` — a per-condition Gaussian (mean + low-rank covariance) fitted to a
  zoo in normalised weight space (a KDE-like baseline generator, also the test double);
* :class:`FolderSampler` — replays the weight sets of a ``sample-weights`` output folder;
* a trained generator export (``rayweights.generators``: ``generator.json`` + models + layout) through
  :func:`load_sampler`, which wraps it in ``rayweights.generators.GeneratorSampler`` (the method's
  own ``sample``: one-step eq. 3 or DDIM/DDPM with diffusers' schedulers, all blocks batched).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from .blocks import LayoutError, WeightLayout
from .runtime import worker_env
from .storage import StorageError, check_writable, exists, read_bytes, resolve, write_bytes_atomic
from .errors import UserError, job_main

__all__ = ["SampleConfig", "DiffusionBlockSampler", "GaussianWeightSampler", "FolderSampler", "load_sampler",
           "register_sampler_loader", "one_step_recover", "reassemble", "save_state_dict", "load_state_dict",
           "condition_slug", "condition_seed", "sample_weights", "main", "SamplingError"]

log = logging.getLogger(__name__)

SAMPLES_INDEX = "samples.json"
SAMPLER_FILE = "sampler.json"
INDEX_VERSION = "rayweights.samples/1"


class SamplingError(UserError, RuntimeError):
    """A generator export, condition or output cannot be used (the message names it)."""


# ----------------------------------------------------------------------------- small helpers
def condition_slug(condition: str | None) -> str:
    """A storage-safe, collision-free folder name for a condition."""
    if condition is None:
        return "unconditional"
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", condition).strip("_.")[:48] or "c"
    return f"{base}-{zlib.crc32(condition.encode()):08x}"


def condition_seed(seed: int, condition: str | None) -> int:
    """Per-condition seed: independent of how conditions are spread over workers."""
    return (int(seed) * 1_000_003 + zlib.crc32((condition or "\0uncond").encode())) % (2 ** 31 - 1)


def _device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def reassemble(blocks: torch.Tensor, layout: WeightLayout, normalized: bool) -> dict[str, torch.Tensor]:
    """Blocks [num_blocks, block_size] -> state_dict of the layout's parameters (normalisation undone)."""
    b = blocks.detach().to(torch.float32).cpu()
    if normalized:
        b = layout.denormalize(b)
    return layout.detokenize(b * layout.valid_mask.to(b.dtype))


def save_state_dict(sd: Mapping[str, torch.Tensor], uri: str, metadata: Mapping[str, Any] | None = None) -> None:
    """Write a safetensors file atomically to a local path or s3:// URI."""
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in sd.items()}, metadata={k: str(v) for k, v in (metadata or {}).items()})
    write_bytes_atomic(resolve(uri), data)


def load_state_dict(uri: str) -> dict[str, torch.Tensor]:
    """Read a safetensors state_dict from a local path or s3:// URI (never unpickles)."""
    from safetensors.torch import load

    try:
        return load(read_bytes(resolve(uri)))
    except FileNotFoundError:
        raise SamplingError(f"{uri}: no such weights file") from None


def _read_json(uri: str) -> dict:
    try:
        return json.loads(read_bytes(resolve(uri)))
    except FileNotFoundError:
        raise SamplingError(f"{uri}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SamplingError(f"{uri}: not valid JSON ({exc})") from exc


def _join(uri: str, *parts: str) -> str:
    return resolve(uri).join(*parts).uri


def _read_layout(uri: str) -> WeightLayout:
    """A layout from a layout.json file or a folder holding one (zoo, export, samples folder)."""
    target = uri if uri.endswith(".json") else _join(uri, "layout.json")
    try:
        return WeightLayout.from_json(read_bytes(resolve(target)))
    except FileNotFoundError:
        raise SamplingError(f"{target}: no layout.json") from None
    except LayoutError as exc:
        raise SamplingError(f"{target}: {exc}") from exc


# ----------------------------------------------------------------------------- diffusion sampling
def _scheduler(kind: str, config: Mapping[str, Any] | None):
    from diffusers import DDIMScheduler, DDPMScheduler

    cfg = dict(config or {})
    cfg.pop("_class_name", None)
    cfg.pop("_diffusers_version", None)
    cfg.setdefault("clip_sample", False)          # no squashing of generated weights
    cls = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "one_step": DDPMScheduler}[kind]
    return cls.from_config(cfg)


def one_step_recover(x_t: torch.Tensor, model_out: torch.Tensor, alpha_bar_t: float,
                     prediction_type: str = "epsilon") -> torch.Tensor:
    """Direct recovery of the clean sample from one forward at timestep t (Denoised Weights eq. 3).

    With alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t) and x_t = alpha_t w + sigma_t eps:
    w0 = (x_t - sigma_t eps_hat) / alpha_t (the paper typesets it as (1/alpha_t) x_t - sigma_t eps_hat,
    which is the same up to the placement of the 1/alpha_t factor; this is the exact inverse)."""
    a = float(alpha_bar_t) ** 0.5
    s = (1.0 - float(alpha_bar_t)) ** 0.5
    if prediction_type == "epsilon":
        return (x_t - s * model_out) / a
    if prediction_type == "v_prediction":
        return a * x_t - s * model_out
    if prediction_type == "sample":
        return model_out
    raise SamplingError(f"prediction_type {prediction_type!r} is not supported (epsilon, v_prediction, sample)")


EpsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Any], torch.Tensor]


class DiffusionBlockSampler:
    """Block-wise diffusion sampling with a diffusers scheduler.

    ``denoiser(x_t [B, block_size], timesteps [B], block_index [B], cond) -> [B, block_size]`` predicts
    epsilon (or v / x0, per the scheduler's ``prediction_type``); ``encode(condition) -> cond`` turns a
    condition into what the denoiser takes (computed once per condition).  Every model is sampled
    with all its blocks in one batched forward per step, ``chunk_blocks`` rows at most per forward
    (0: no limit).  ``method``: ``one_step`` (direct recovery at ``t``), ``ddim`` or ``ddpm``
    (``steps`` inference steps).  Samples are in the layout's normalised space (``normalized=True``).
    """

    normalized = True

    def __init__(self, denoiser: EpsFn, layout: WeightLayout, scheduler_config: Mapping[str, Any] | None = None,
                 encode: Callable[[str | None], Any] | None = None, method: str = "one_step", t: int = 500,
                 steps: int = 50, eta: float = 0.0, chunk_blocks: int = 0, device: str = "auto",
                 dtype: torch.dtype = torch.float32):
        if method not in ("one_step", "ddim", "ddpm"):
            raise SamplingError(f"method: {method!r} is not one of one_step, ddim, ddpm")
        self.denoiser, self.layout, self.encode = denoiser, layout, encode or (lambda c: c)
        self.method, self.t, self.steps, self.eta = method, int(t), int(steps), float(eta)
        self.chunk_blocks, self.device, self.dtype = int(chunk_blocks), _device(device), dtype
        self.scheduler = _scheduler(method, scheduler_config)
        T = self.scheduler.config.num_train_timesteps
        if method == "one_step" and not 0 <= self.t < T:
            raise SamplingError(f"t: {self.t} is outside [0, {T}) of the scheduler")
        if method != "one_step" and not 1 <= self.steps <= T:
            raise SamplingError(f"steps: {self.steps} is outside [1, {T}]")

    def _forward(self, x, t, bidx, cond):
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            return self.denoiser(x, t, bidx, cond).float()

    def _run_rows(self, x: torch.Tensor, bidx: torch.Tensor, cond, gen: torch.Generator) -> torch.Tensor:
        """Denoise rows x [R, bs] (their block indices ``bidx``) from pure noise to clean blocks."""
        pred = self.scheduler.config.prediction_type
        if self.method == "one_step":
            tt = torch.full((x.shape[0],), self.t, dtype=torch.long, device=x.device)
            out = self._forward(x, tt, bidx, cond)
            return one_step_recover(x, out, float(self.scheduler.alphas_cumprod[self.t]), pred)
        self.scheduler.set_timesteps(self.steps)
        for step_t in self.scheduler.timesteps:
            tt = torch.full((x.shape[0],), int(step_t), dtype=torch.long, device=x.device)
            out = self._forward(x, tt, bidx, cond)
            if self.method == "ddim":
                x = self.scheduler.step(out, int(step_t), x, eta=self.eta, generator=gen).prev_sample
            else:
                x = self.scheduler.step(out, int(step_t), x, generator=gen).prev_sample
        return x

    def sample(self, condition: str | None, n: int, seed: int = 0) -> torch.Tensor:
        L, dev = self.layout, self.device
        nb, bs = L.num_blocks, L.block_size
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        noise = torch.randn(n * nb, bs, generator=gen)
        bidx_all = torch.arange(nb).repeat(n)
        cond = self.encode(condition)
        out = torch.empty(n * nb, bs)
        rows = n * nb if self.chunk_blocks <= 0 else self.chunk_blocks
        for s in range(0, n * nb, rows):
            x = noise[s:s + rows].to(dev)
            b = bidx_all[s:s + rows].to(dev)
            out[s:s + rows] = self._run_rows(x, b, cond, gen).cpu()
        return out.view(n, nb, bs) * L.valid_mask


# ----------------------------------------------------------------------------- Gaussian baseline
class GaussianWeightSampler:
    """Per-condition Gaussian over normalised flat weights: mean + rank-``k`` covariance from the
    zoo members of that condition (their last ``last_k`` checkpoints); conditions the zoo does not
    have (and ``None``) use the Gaussian fitted to every member.  A KDE-style baseline generator."""

    normalized = True

    def __init__(self, layout: WeightLayout, components: Mapping[str, tuple[torch.Tensor, torch.Tensor]]):
        if not layout.has_stats:
            raise SamplingError("GaussianWeightSampler: the layout needs normalisation stats")
        if "" not in components:
            raise SamplingError("GaussianWeightSampler: the pooled component ('') is required")
        self.layout, self.components = layout, dict(components)

    @classmethod
    def fit(cls, zoo, rank: int = 8, last_k: int | None = None) -> "GaussianWeightSampler":
        from .table import open_zoo

        zoo = open_zoo(zoo) if isinstance(zoo, str) else zoo
        members = zoo.members.to_pylist()
        if not members:
            raise SamplingError(f"zoo {zoo.uri}: no members to fit")
        by_cond: dict[str, list[str]] = {}
        for r in members:
            by_cond.setdefault(r["condition"], []).append(r["member_id"])
        per = {c: zoo.blocks(ids, last_k=last_k) for c, ids in by_cond.items()}
        layout = zoo.layout.fit_stats(torch.cat(list(per.values())))

        def fit_one(blocks):
            x = layout.normalize(blocks).reshape(blocks.shape[0], -1).to(torch.float64)
            mean = x.mean(0)
            if x.shape[0] < 2 or rank == 0:
                return mean.float(), torch.zeros(0, x.shape[1])
            _, S, V = torch.linalg.svd(x - mean, full_matrices=False)
            k = min(rank, x.shape[0] - 1)
            return mean.float(), (S[:k, None] / (x.shape[0] - 1) ** 0.5 * V[:k]).float()

        comps = {c: fit_one(b) for c, b in per.items()}
        comps[""] = fit_one(torch.cat(list(per.values())))
        return cls(layout, comps)

    def sample(self, condition: str | None, n: int, seed: int = 0) -> torch.Tensor:
        mean, basis = self.components.get(condition or "", self.components[""])
        g = torch.Generator().manual_seed(int(seed))
        z = torch.randn(n, basis.shape[0], generator=g)
        x = mean[None] + z @ basis
        return x.view(n, self.layout.num_blocks, self.layout.block_size) * self.layout.valid_mask

    def save(self, uri: str) -> None:
        from safetensors.torch import save

        conds = sorted(self.components)
        tensors = {}
        for i, c in enumerate(conds):
            tensors[f"mean.{i}"], tensors[f"basis.{i}"] = (t.contiguous() for t in self.components[c])
        root = resolve(uri)
        write_bytes_atomic(root.join("gaussian.safetensors"), save(tensors))
        write_bytes_atomic(root.join("layout.json"), self.layout.to_json().encode())
        write_bytes_atomic(root.join(SAMPLER_FILE), json.dumps({"type": "gaussian", "conditions": conds}).encode())

    @classmethod
    def load(cls, uri: str) -> "GaussianWeightSampler":
        from safetensors.torch import load

        meta = _read_json(_join(uri, SAMPLER_FILE))
        try:
            t = load(read_bytes(resolve(_join(uri, "gaussian.safetensors"))))
        except FileNotFoundError:
            raise SamplingError(f"{uri}: gaussian.safetensors missing") from None
        comps = {c: (t[f"mean.{i}"], t[f"basis.{i}"]) for i, c in enumerate(meta["conditions"])}
        return cls(_read_layout(uri), comps)


# ----------------------------------------------------------------------------- replaying a samples folder
class FolderSampler:
    """The weight sets written by :func:`sample_weights` (raw weights, ``normalized=False``).
    ``sample(condition, n)`` returns that condition's first ``n`` samples (``seed`` is ignored)."""

    normalized = False

    def __init__(self, uri: str):
        self.uri = uri
        index = _read_json(_join(uri, SAMPLES_INDEX))
        if index.get("format_version") != INDEX_VERSION:
            raise SamplingError(f"{_join(uri, SAMPLES_INDEX)}: format_version {index.get('format_version')!r} "
                                f"is not {INDEX_VERSION!r}")
        self.index = index
        self.layout = _read_layout(uri)
        self.by_condition: dict[str | None, list[dict]] = {}
        for e in index["samples"]:
            self.by_condition.setdefault(e["condition"], []).append(e)
        for v in self.by_condition.values():
            v.sort(key=lambda e: e["sample"])

    def seconds_per_sample(self, condition: str | None) -> float:
        es = self.by_condition.get(condition) or []
        return float(np.mean([e["seconds"] for e in es])) if es else float("nan")

    def sample(self, condition: str | None, n: int, seed: int = 0) -> torch.Tensor:
        es = self.by_condition.get(condition)
        if not es:
            raise SamplingError(f"{self.uri}: no samples for condition {condition!r} "
                                f"(have: {sorted(map(str, self.by_condition))[:5]})")
        if len(es) < n:
            raise SamplingError(f"{self.uri}: condition {condition!r} has {len(es)} samples, {n} requested")
        return torch.stack([self.layout.tokenize(load_state_dict(_join(self.uri, e["file"]))) for e in es[:n]])


# ----------------------------------------------------------------------------- loading any sampler
_LOADERS: list[tuple[str, Callable[..., Any]]] = []


def register_sampler_loader(name: str, probe_and_load: Callable[..., Any]) -> None:
    """Register ``fn(uri, **opts) -> sampler or None`` (None: not this kind of export)."""
    _LOADERS.append((name, probe_and_load))


def load_sampler(uri: str, method: str = "one_step", t: int = 500, steps: int = 50, chunk_blocks: int = 0,
                 device: str = "auto", dtype: str = "float32", layout: str | None = None):
    """A :class:`WeightSampler` for ``uri``: a folder with ``sampler.json`` (Gaussian baseline), a
    ``sample-weights`` output (``samples.json``), or a generator export (``rayweights.generators``)."""
    if exists(resolve(_join(uri, SAMPLER_FILE))):
        kind = _read_json(_join(uri, SAMPLER_FILE)).get("type")
        if kind == "gaussian":
            return GaussianWeightSampler.load(uri)
        raise SamplingError(f"{_join(uri, SAMPLER_FILE)}: unknown sampler type {kind!r}")
    if exists(resolve(_join(uri, SAMPLES_INDEX))):
        return FolderSampler(uri)
    opts = dict(method=method, t=t, steps=steps, chunk_blocks=chunk_blocks, device=device, dtype=dtype, layout=layout)
    if exists(resolve(_join(uri, "generator.json"))):          # a rayweights.generators export
        from .generators import GeneratorError, sampler_loader

        try:
            s = sampler_loader(uri, **opts)
        except GeneratorError as exc:
            raise SamplingError(f"generator: {exc}") from exc
        if s is not None:
            return s
    for _, fn in _LOADERS:
        s = fn(uri, **opts)
        if s is not None:
            return s
    raise SamplingError(f"generator: {uri} is not a generator export, a samples folder or a sampler folder")


# ----------------------------------------------------------------------------- the job
@dataclass
class SampleConfig:
    generator: str = ""                # generator export / sampler folder (required)
    conditions: list[str] = field(default_factory=list)   # prompts, dataset names/paths; [] = unconditional
    num_samples: int = 1               # per condition (total when unconditional)
    method: str = "one_step"           # one_step | ddim | ddpm
    t: int = 500                       # one-step timestep (towards the noise side)
    steps: int = 50                    # ddim / ddpm inference steps
    seed: int = 0
    output: str = ""                   # output URI (or --output)
    layout: str = ""                   # layout.json / zoo URI when the export carries none
    write_table: bool = False          # also write the samples as a weight-block table under <output>/table
    concurrency: int = 1               # sampler actors
    num_gpus: float = -1.0             # per actor; -1 = 1 when the cluster has GPUs, else 0
    chunk_blocks: int = 0              # rows per forward (0 = all blocks of all n samples at once)
    device: str = "auto"
    dtype: str = "float32"             # float32 | bfloat16 | float16 (autocast of the denoiser)
    label_conditions: bool = False     # an unconditional generator: conditions only name the sample folders

    def __post_init__(self):
        if self.method not in ("one_step", "ddim", "ddpm"):
            raise ValueError(f"method: {self.method!r} is not one of one_step, ddim, ddpm")
        if self.num_samples < 1:
            raise ValueError("num_samples: must be >= 1")
        if self.t < 0 or self.steps < 1:
            raise ValueError("t: must be >= 0; steps: must be >= 1")
        if self.concurrency < 1:
            raise ValueError("concurrency: must be >= 1")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype: {self.dtype!r} is not float32, bfloat16 or float16")
        if len(set(self.conditions)) != len(self.conditions):
            raise ValueError("conditions: duplicates")


class _SampleActor:
    """Ray Data actor: loads the sampler once; each row = one condition -> its weight sets on storage."""

    def __init__(self, cfg: dict, layout_json: str, env: dict):
        for k, v in env.items():
            os.environ.setdefault(k, v)
        self.cfg = SampleConfig(**cfg)
        c = self.cfg
        self.sampler = load_sampler(c.generator, c.method, c.t, c.steps, c.chunk_blocks, c.device, c.dtype,
                                    c.layout or None)
        self.layout = WeightLayout.from_json(layout_json)
        self.writer = None
        if c.write_table:
            from .table import ZooWriter

            self.writer = ZooWriter(_join(c.output, "table"), self.layout)

    def __call__(self, batch: dict) -> dict:
        c = self.cfg
        out = {k: [] for k in ("condition", "sample", "file", "seconds", "finite")}
        for cond, is_none in zip(batch["condition"], batch["unconditional"]):
            condition = None if is_none else str(cond)
            seed = condition_seed(c.seed, condition)
            t0 = time.perf_counter()
            blocks = self.sampler.sample(condition, c.num_samples, seed)
            if blocks.is_cuda:
                torch.cuda.synchronize()
            per = (time.perf_counter() - t0) / c.num_samples
            slug = condition_slug(condition)
            raw = []
            for i in range(c.num_samples):
                sd = reassemble(blocks[i], self.layout, self.sampler.normalized)
                rel = f"samples/{slug}/sample-{i:05d}.safetensors"
                save_state_dict(sd, _join(c.output, rel), {
                    "condition": condition if condition is not None else "", "sample": i, "method": c.method,
                    "t": c.t, "steps": c.steps, "seed": seed, "generator": c.generator})
                if self.writer is not None:
                    raw.append(self.layout.tokenize(sd))
                out["condition"].append(condition if condition is not None else "")
                out["sample"].append(i)
                out["file"].append(rel)
                out["seconds"].append(per)
                out["finite"].append(bool(torch.isfinite(blocks[i]).all()))
            if self.writer is not None:
                from .table import CheckpointRecord

                for i, b in enumerate(raw):
                    if bool(torch.isfinite(b).all()):
                        self.writer.write_member(f"{slug}-s{i:05d}", slug, condition or "", seed + i,
                                                 [CheckpointRecord(step=0, blocks=b)],
                                                 {"method": c.method, "t": c.t, "steps": c.steps})
        return {k: np.asarray(v) for k, v in out.items()}


def _sampler_layout(cfg: SampleConfig) -> WeightLayout:
    s = load_sampler(cfg.generator, cfg.method, cfg.t, cfg.steps, cfg.chunk_blocks, "cpu", cfg.dtype,
                     cfg.layout or None)
    if s.normalized and not s.layout.has_stats:
        raise SamplingError(f"generator: {cfg.generator} produces normalised blocks but its layout has no stats")
    if cfg.layout:                       # given explicitly: it must be the generator's, never silently ignored
        given = _read_layout(cfg.layout)
        if not given.same_structure(s.layout):
            raise SamplingError(f"layout: {cfg.layout} ({given.num_blocks} blocks x {given.block_size}) does not match "
                                f"the generator's layout ({s.layout.num_blocks} x {s.layout.block_size})")
    method = getattr(s, "method", None)
    unconditional = method is not None and getattr(method, "conditioning", "") is None
    if cfg.conditions and not cfg.label_conditions and unconditional:
        raise SamplingError(f"conditions: generator {cfg.generator} ({getattr(method, 'name', '?')}) is unconditional; "
                            f"give no conditions (got {cfg.conditions[0]!r}), or set label_conditions: true")
    return s.layout


def sample_weights(cfg: SampleConfig, address: str | None = None, show_progress: bool = True) -> list[dict]:
    """Sample ``cfg.num_samples`` weight sets per condition with a Ray Data actor pool; returns the
    index entries (also written to ``<output>/samples.json`` once every file is written)."""
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy

    from .runtime import ray_init

    if not cfg.generator:
        raise SamplingError("generator: required (a generator export or sampler folder)")
    if not cfg.output:
        raise SamplingError("output: required (--output or output=...)")
    layout = _sampler_layout(cfg)
    try:
        check_writable(cfg.output)
    except StorageError as exc:
        raise SamplingError(str(exc)) from exc
    if cfg.write_table:
        from .table import ZooError, ZooWriter

        try:
            ZooWriter.create(_join(cfg.output, "table"), layout)
        except ZooError as exc:
            raise SamplingError(f"write_table: {exc}") from exc
    ray_init(address)
    gpus = cfg.num_gpus
    if gpus < 0:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    conds = list(cfg.conditions)
    rows = [{"condition": c, "unconditional": False} for c in conds] or [{"condition": "", "unconditional": True}]
    env = worker_env()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = show_progress
    ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
    ds = ds.map_batches(_SampleActor, batch_size=1, batch_format="numpy",
                        fn_constructor_kwargs={"cfg": dataclasses.asdict(cfg), "layout_json": layout.to_json(),
                                               "env": env},
                        compute=ActorPoolStrategy(size=min(cfg.concurrency, len(rows))), num_gpus=gpus,
                        num_cpus=1)
    entries = []
    for r in ds.iter_rows():
        entries.append({"condition": (None if not conds else str(r["condition"])), "sample": int(r["sample"]),
                        "file": str(r["file"]), "seconds": float(r["seconds"]), "finite": bool(r["finite"])})
    entries.sort(key=lambda e: (str(e["condition"]), e["sample"]))
    bad = [e for e in entries if not e["finite"]]
    if bad:
        log.warning("%d sample(s) contain NaN/Inf weights (e.g. %s)", len(bad), bad[0]["file"])
    root = resolve(cfg.output)
    write_bytes_atomic(root.join("layout.json"), layout.to_json().encode())
    if cfg.write_table:
        from .table import ZooWriter

        ZooWriter(_join(cfg.output, "table"), layout).consolidate()
    index = {"format_version": INDEX_VERSION, "generator": cfg.generator, "method": cfg.method, "t": cfg.t,
             "steps": cfg.steps, "seed": cfg.seed, "num_samples": cfg.num_samples, "samples": entries,
             "created_at": time.time()}
    write_bytes_atomic(root.join(SAMPLES_INDEX), json.dumps(index, indent=1).encode())
    return entries


@job_main
def main(argv: Sequence[str] | None = None) -> int:
    from .config import ConfigError, job_argparser, job_overrides, load_config

    p = job_argparser("Sample weights for conditions from a trained generator; write safetensors state_dicts.",
                      config_required=False)
    args = p.parse_args(argv)
    cfg = load_config(SampleConfig, args.config, job_overrides(args))
    if not cfg.generator:
        raise ConfigError("generator: required (a generator export or sampler folder)")
    if not cfg.output:
        raise ConfigError("output: required (--output or --set output=...)")
    entries = sample_weights(cfg, args.address)
    n_cond = len({e["condition"] for e in entries})
    print(f"wrote {len(entries)} weight set(s) for {n_cond} condition(s) to {cfg.output} "
          f"(method {cfg.method}{', t=' + str(cfg.t) if cfg.method == 'one_step' else ', steps=' + str(cfg.steps)}; "
          f"mean {np.mean([e['seconds'] for e in entries]):.4f} s per weight set)")
    return 0
