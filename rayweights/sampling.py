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

* :class:`GeneratorSampler` — a trained generator export (``rayweights.generators``:
  ``generator.json`` + models + layout): the method's own ``sample`` (one-step eq. 3 or DDIM/DDPM
  with diffusers' schedulers, :mod:`rayweights.generators.diffusion`), all blocks batched;
* :class:`GaussianWeightSampler` — a per-condition Gaussian (mean + low-rank covariance) fitted to a
  zoo in normalised weight space (a KDE-like baseline generator, also the test double);
* :class:`FolderSampler` — replays the weight sets of a ``sample-weights`` output folder.

:func:`load_sampler` opens any of them from a folder.  (Over ~400 lines because the samplers and the
job share one folder format — ``samples.json``, ``sampler.json``, ``layout.json``; the diffusion
itself lives in :mod:`rayweights.generators.diffusion`.)
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
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import ray
import ray.data
import torch
from ray.data import ActorPoolStrategy
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .blocks import LayoutError, WeightLayout
from .config import ConfigError, job_argparser, job_overrides, load_config
from .device import torch_device
from .errors import UserError, job_main
from .generators import GeneratorError, GeneratorMethod, SamplingMode, is_generator_export, load_generator
from .runtime import ray_init, worker_env
from .storage import StorageError, check_writable, exists, join, read_bytes, resolve, write_bytes_atomic
from .table import CheckpointRecord, ZooError, ZooWriter, open_zoo

__all__ = ["SampleConfig", "GeneratorSampler", "GaussianWeightSampler", "FolderSampler", "load_sampler",
           "reassemble", "save_state_dict", "load_state_dict", "condition_slug", "condition_seed", "sample_weights",
           "main", "SamplingError", "DTYPES"]

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


def reassemble(blocks: torch.Tensor, layout: WeightLayout, normalized: bool) -> dict[str, torch.Tensor]:
    """Blocks [num_blocks, block_size] -> state_dict of the layout's parameters (normalisation undone)."""
    b = blocks.detach().to(torch.float32).cpu()
    if normalized:
        b = layout.denormalize(b)
    return layout.detokenize(b * layout.valid_mask.to(b.dtype))


def save_state_dict(sd: Mapping[str, torch.Tensor], uri: str, metadata: Mapping[str, Any] | None = None) -> None:
    """Write a safetensors file atomically to a local path or s3:// URI."""
    data = st_save({k: v.contiguous() for k, v in sd.items()}, metadata={k: str(v) for k, v in (metadata or {}).items()})
    write_bytes_atomic(resolve(uri), data)


def load_state_dict(uri: str) -> dict[str, torch.Tensor]:
    """Read a safetensors state_dict from a local path or s3:// URI (never unpickles)."""
    try:
        return st_load(read_bytes(resolve(uri)))
    except FileNotFoundError:
        raise SamplingError(f"{uri}: no such weights file") from None


def _read_json(uri: str) -> dict:
    try:
        return json.loads(read_bytes(resolve(uri)))
    except FileNotFoundError:
        raise SamplingError(f"{uri}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SamplingError(f"{uri}: not valid JSON ({exc})") from exc


def _read_layout(uri: str) -> WeightLayout:
    """A layout from a layout.json file or a folder holding one (zoo, export, samples folder)."""
    target = uri if uri.endswith(".json") else join(uri, "layout.json")
    try:
        return WeightLayout.from_json(read_bytes(resolve(target)))
    except FileNotFoundError:
        raise SamplingError(f"{target}: no layout.json") from None
    except LayoutError as exc:
        raise SamplingError(f"{target}: {exc}") from exc


# ----------------------------------------------------------------------------- a trained generator
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class GeneratorSampler:
    """A trained generator (``rayweights.generators``) as a ``WeightSampler``:
    ``sample(condition, n, seed) -> [n, num_blocks, block_size]`` in normalised space, through the
    method's own ``sample`` (one-step, DDIM or DDPM; ``chunk_blocks`` rows per forward at most;
    ``guidance_scale``: classifier-free guidance, 1 = off)."""

    normalized = True

    def __init__(self, method: GeneratorMethod, mode: SamplingMode = "one_step", t: int = 500, steps: int = 50,
                 eta: float = 0.0, chunk_blocks: int = 0, device: str = "auto", dtype: str = "float32",
                 guidance_scale: float = 1.0):
        self.method, self.mode, self.t, self.steps, self.eta = method, mode, int(t), int(steps), float(eta)
        self.chunk_blocks, self.guidance_scale = int(chunk_blocks), float(guidance_scale)
        try:
            method.check_guidance(self.guidance_scale)
        except GeneratorError as exc:
            raise SamplingError(str(exc)) from None
        try:
            self.device = torch_device(device)
        except ValueError as exc:
            raise SamplingError(str(exc)) from None
        if dtype not in DTYPES:
            raise SamplingError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
        self.dtype = DTYPES[dtype]

    @property
    def layout(self) -> WeightLayout:
        return self.method.layout

    def sample(self, condition: str | None, n: int, seed: int = 0) -> torch.Tensor:
        return self.method.sample([condition], n, mode=self.mode, t=self.t, steps=self.steps, eta=self.eta,
                                  seed=seed, device=self.device, dtype=self.dtype, chunk_blocks=self.chunk_blocks,
                                  guidance_scale=self.guidance_scale)


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
        conds = sorted(self.components)
        tensors = {}
        for i, c in enumerate(conds):
            tensors[f"mean.{i}"], tensors[f"basis.{i}"] = (t.contiguous() for t in self.components[c])
        root = resolve(uri)
        write_bytes_atomic(root.join("gaussian.safetensors"), st_save(tensors))
        write_bytes_atomic(root.join("layout.json"), self.layout.to_json().encode())
        write_bytes_atomic(root.join(SAMPLER_FILE), json.dumps({"type": "gaussian", "conditions": conds}).encode())

    @classmethod
    def load(cls, uri: str) -> "GaussianWeightSampler":
        meta = _read_json(join(uri, SAMPLER_FILE))
        try:
            t = st_load(read_bytes(resolve(join(uri, "gaussian.safetensors"))))
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
        index = _read_json(join(uri, SAMPLES_INDEX))
        if index.get("format_version") != INDEX_VERSION:
            raise SamplingError(f"{join(uri, SAMPLES_INDEX)}: format_version {index.get('format_version')!r} "
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
        return torch.stack([self.layout.tokenize(load_state_dict(join(self.uri, e["file"]))) for e in es[:n]])


# ----------------------------------------------------------------------------- loading any sampler
def load_sampler(uri: str, method: SamplingMode = "one_step", t: int = 500, steps: int = 50, chunk_blocks: int = 0,
                 device: str = "auto", dtype: str = "float32", layout: str | None = None,
                 guidance_scale: float = 1.0):
    """A ``WeightSampler`` for ``uri``: a folder with ``sampler.json`` (Gaussian baseline), a
    ``sample-weights`` output (``samples.json``), or a generator export (``generator.json``).
    ``layout`` is accepted for the callers' uniformity: every one of these carries its own.
    ``guidance_scale`` (classifier-free guidance) applies to a generator export only."""
    if guidance_scale != 1.0 and not is_generator_export(uri):
        raise SamplingError(f"guidance_scale: {guidance_scale} needs a generator export, and {uri} is none (use 1.0)")
    if exists(resolve(join(uri, SAMPLER_FILE))):
        kind = _read_json(join(uri, SAMPLER_FILE)).get("type")
        if kind == "gaussian":
            return GaussianWeightSampler.load(uri)
        raise SamplingError(f"{join(uri, SAMPLER_FILE)}: unknown sampler type {kind!r}")
    if exists(resolve(join(uri, SAMPLES_INDEX))):
        return FolderSampler(uri)
    if is_generator_export(uri):
        try:
            return GeneratorSampler(load_generator(uri), method, t, steps, 0.0, chunk_blocks, device, dtype,
                                    guidance_scale)
        except GeneratorError as exc:
            raise SamplingError(f"generator: {exc}") from exc
    raise SamplingError(f"generator: {uri} is not a generator export, a samples folder or a sampler folder")


# ----------------------------------------------------------------------------- the job
@dataclass
class SampleConfig:
    generator: str = ""                # generator export / sampler folder (required)
    conditions: list[str] = field(default_factory=list)   # prompts, dataset names/paths; [] = unconditional
    num_samples: int = 1               # per condition (total when unconditional)
    method: SamplingMode = "one_step"
    t: int = 500                       # one-step timestep (towards the noise side)
    steps: int = 50                    # ddim / ddpm inference steps
    guidance_scale: float = 1.0        # classifier-free guidance (1 = off; needs a generator trained with cond_dropout)
    seed: int = 0
    output: str = ""                   # output URI (or --output)
    layout: str = ""                   # layout.json / zoo URI when the export carries none
    write_table: bool = False          # also write the samples as a weight-block table under <output>/table
    concurrency: int = 1               # sampler actors
    num_gpus: float = -1.0             # per actor; -1 = 1 when the cluster has GPUs, else 0
    chunk_blocks: int = 0              # rows per forward (0 = all blocks of all n samples at once)
    device: str = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"     # autocast of the denoiser
    label_conditions: bool = False     # an unconditional generator: conditions only name the sample folders

    def __post_init__(self):
        if self.num_samples < 1:
            raise ValueError("num_samples: must be >= 1")
        if self.t < 0 or self.steps < 1:
            raise ValueError("t: must be >= 0; steps: must be >= 1")
        if self.concurrency < 1:
            raise ValueError("concurrency: must be >= 1")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale: must be >= 0, got {self.guidance_scale}")
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
                                    c.layout or None, c.guidance_scale)
        self.layout = WeightLayout.from_json(layout_json)
        self.writer = None
        if c.write_table:
            self.writer = ZooWriter(join(c.output, "table"), self.layout)

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
                save_state_dict(sd, join(c.output, rel), {
                    "condition": condition if condition is not None else "", "sample": i, "method": c.method,
                    "t": c.t, "steps": c.steps, "seed": seed, "generator": c.generator,
                    "guidance_scale": c.guidance_scale})
                if self.writer is not None:
                    raw.append(self.layout.tokenize(sd))
                out["condition"].append(condition if condition is not None else "")
                out["sample"].append(i)
                out["file"].append(rel)
                out["seconds"].append(per)
                out["finite"].append(bool(torch.isfinite(blocks[i]).all()))
            if self.writer is not None:
                for i, b in enumerate(raw):
                    if bool(torch.isfinite(b).all()):
                        self.writer.write_member(f"{slug}-s{i:05d}", slug, condition or "", seed + i,
                                                 [CheckpointRecord(step=0, blocks=b)],
                                                 {"method": c.method, "t": c.t, "steps": c.steps})
        return {k: np.asarray(v) for k, v in out.items()}


def _sampler_layout(cfg: SampleConfig) -> WeightLayout:
    s = load_sampler(cfg.generator, cfg.method, cfg.t, cfg.steps, cfg.chunk_blocks, "cpu", cfg.dtype,
                     cfg.layout or None, cfg.guidance_scale)
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
        try:
            ZooWriter.create(join(cfg.output, "table"), layout)
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
        ZooWriter(join(cfg.output, "table"), layout).consolidate()
    index = {"format_version": INDEX_VERSION, "generator": cfg.generator, "method": cfg.method, "t": cfg.t,
             "steps": cfg.steps, "seed": cfg.seed, "num_samples": cfg.num_samples, "samples": entries,
             "created_at": time.time()}
    write_bytes_atomic(root.join(SAMPLES_INDEX), json.dumps(index, indent=1).encode())
    return entries


@job_main
def main(argv: Sequence[str] | None = None) -> int:
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
