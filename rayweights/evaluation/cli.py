"""``evaluate`` (``jobs/evaluate.py``): generated vs baseline initialisations on held-out tasks.

    python jobs/evaluate.py --config cfg.yaml --output runs/x/eval \\
        --set zoo=runs/x/zoo --set generator=runs/x/generator --set 'tasks=["digits:0,1,2,5,6"]'

1. samples ``num_samples`` weight sets per task with ``rayweights.sampling.sample_weights``
   (Ray Data, GPUs when present) into ``<output>/samples`` — or reuses a ``samples`` folder;
2. evaluates every task in its own Ray task (:func:`rayweights.evaluation.core.evaluate_task`);
3. writes ``report.md`` (also printed), ``results.json`` and the PNG curves under ``<output>``.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Sequence

import ray
import torch

from .. import runtime  # runtime.ray_init at call time: tests can forbid starting Ray
from ..blocks import LayoutError
from ..config import ConfigError, check_import_allowed, job_argparser, job_overrides, load_config
from ..errors import job_main
from ..generators import SamplingMode
from ..sampling import FolderSampler, SampleConfig, SamplingError, load_sampler, sample_weights
from ..storage import StorageError, check_writable, resolve, write_bytes_atomic
from ..table import ZooError, open_zoo
from .adapters import AdapterError, check_family_options, make_adapter
from .core import ALL_INITS, EvalOptions, TaskResult, ZooReference, evaluate_task, sample_blocks_raw
from .diagnostics import zoo_weights
from .families import read_zoo_spec
from .memorisation import memorisation_study
from .report import verdict_sentences, write_report

__all__ = ["EvaluateConfig", "evaluate", "main", "resolve_defaults", "validate"]


@dataclass
class EvaluateConfig:
    """The ``evaluate`` config.  A config is trusted input only when it says so: ``family:
    package.module:factory`` and ``feature_extractor: module:...`` import and run code, and are
    refused unless ``allow_import: true`` is set."""

    zoo: str = ""                      # zoo URI the generator was trained on (required)
    generator: str = ""                # generator export: sampled here ...
    samples: str = ""                  # ... or a sample-weights output folder to reuse
    family: str = ""                   # adapter family (registered name or module:factory); default: the zoo's
    family_options: dict[str, Any] = field(default_factory=dict)
    tasks: list[str] = field(default_factory=list)   # task conditions; default: the zoo's held-out tasks
    num_samples: int = 10              # N
    epochs: int = 10                   # E
    method: SamplingMode = "one_step"
    t: int = 500                       # one-step timestep
    steps: int = 50                    # ddim / ddpm steps
    seeds: list[int] = field(default_factory=lambda: [0])
    inits: list[str] = field(default_factory=lambda: list(ALL_INITS))
    noise_frac: float = 0.1
    noise_anchor: str = "sample"
    soup: str = "all"
    pretrained: str = "auto"
    max_zoo_members: int = 256
    iou_members: int = 32
    target_tol: float = 0.0
    # FID/KID extractor for image families (concepts): "trained" = the zoo's edit-operation CNN, trained once
    # on the procedural images into <zoo>/extractor/ on first use (offline; not Inception FID) |
    # trained:<dir> (another such folder) | inception:<dir> (clean-fid's inception-2015-12-05.pt in a local
    # folder, as on a cluster: real FID) | small[:dim] (a RANDOM network: not FID, comparable only with
    # itself) | module:...   The report names the extractor and the image counts next to every FID/KID.
    feature_extractor: str = "trained"
    output: str = ""
    parallel: bool = True              # one Ray task per evaluation task (else all in this process)
    num_gpus: float = 0.0              # per evaluation task
    cpus_per_task: float = 1.0         # per evaluation task (torch threads follow OMP_NUM_THREADS set by Ray)
    sample_concurrency: int = 1
    sample_chunk_blocks: int = 0
    seed: int = 0
    allow_import: bool = False         # a config is trusted input only when it says so: module:factory imports code
    # memorisation (Zeng et al. 2025) on seen tasks: zoo conditions whose training checkpoints the
    # generator's samples are compared with (accuracy vs novelty scatter in the report); [] = off
    memorisation_tasks: list[str] = field(default_factory=list)
    memorisation_samples: int = 100
    memorisation_sigmas: list[float] = field(default_factory=lambda: [0.01, 0.05, 0.1, 0.3])

    def __post_init__(self):
        if ":" in self.family:
            check_import_allowed(self.family, "family", self.allow_import)
        for name, fx in (("feature_extractor", self.feature_extractor),
                         ("family_options.feature_extractor", self.family_options.get("feature_extractor", ""))):
            if isinstance(fx, str) and fx.startswith("module:"):
                check_import_allowed(fx, name, self.allow_import)
        if ":" not in self.family:          # typos in the options of a built-in family fail here, at load
            check_family_options(self.family, self.family_options)
        if self.generator and self.samples:
            raise ValueError("generator/samples: give one of them, not both")
        if self.memorisation_samples < 1:
            raise ValueError("memorisation_samples: must be >= 1")
        if any(s < 0 for s in self.memorisation_sigmas):
            raise ValueError("memorisation_sigmas: noise levels must be >= 0")

    def options(self) -> EvalOptions:
        return EvalOptions(num_samples=self.num_samples, epochs=self.epochs, seeds=list(self.seeds),
                           inits=list(self.inits), noise_frac=self.noise_frac, noise_anchor=self.noise_anchor,
                           soup=self.soup, pretrained=self.pretrained, max_zoo_members=self.max_zoo_members,
                           iou_members=self.iou_members, sample_seed=self.seed, target_tol=self.target_tol)


def _family_options(cfg: EvaluateConfig) -> dict:
    opts = dict(cfg.family_options)
    if cfg.family == "concepts":           # image translation: FID needs the extractor
        opts.setdefault("feature_extractor", cfg.feature_extractor)
    return opts


def _evaluate_one(cfg: EvaluateConfig, condition: str, samples_uri: str, show_progress: bool) -> TaskResult:
    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))
    zoo = open_zoo(cfg.zoo)
    adapter = make_adapter(cfg.family, condition, zoo, _family_options(cfg))
    ref = ZooReference(zoo, max_members=cfg.max_zoo_members, seed=cfg.seed)
    sampler = load_sampler(samples_uri)
    return evaluate_task(adapter, sampler, ref, cfg.options(), show_progress=show_progress)


DONE_MARKER = "results.json"      # what later stages trust as "this evaluation is complete"
def _memorisation_one(cfg: EvaluateConfig, condition: str):
    """Zeng et al.'s study on one seen task: the generator's samples vs the task's training checkpoints."""
    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))
    zoo = open_zoo(cfg.zoo)
    adapter = make_adapter(cfg.family, condition, zoo, _family_options(cfg))
    z, groups = zoo_weights(zoo)
    conds = {r["member_id"]: r["condition"] for r in zoo.members.to_pylist()}
    keep = torch.tensor([conds[g] == condition for g in groups])
    sampler = load_sampler(cfg.generator, cfg.method, cfg.t, cfg.steps, device="cpu")
    n = cfg.memorisation_samples
    method = getattr(sampler, "method", None)
    unconditional = method is not None and method.conditioning is None
    gen = sample_blocks_raw(sampler, None if unconditional else condition, n, cfg.seed).reshape(n, -1)
    label = f"generated ({cfg.method}" + (f" t={cfg.t})" if cfg.method == "one_step" else f" {cfg.steps} steps)")
    return memorisation_study(adapter, zoo.layout, z[keep], {label: gen},
                              train_groups=[g for g, k in zip(groups, keep.tolist()) if k], n=n,
                              sigmas=cfg.memorisation_sigmas, seed=cfg.seed, task=condition)


def _publish(local_dir: str, uri: str) -> None:
    """Copy a finished local report folder to ``uri`` file by file, the done marker last: a crash
    midway never leaves a folder that looks complete with files missing."""
    root = resolve(uri)
    rels = sorted(os.path.relpath(os.path.join(d, f), local_dir) for d, _, fs in os.walk(local_dir) for f in fs)
    rels.sort(key=lambda rel: rel == DONE_MARKER)          # stable: the marker moves to the end
    for rel in rels:
        with open(os.path.join(local_dir, rel), "rb") as fh:
            write_bytes_atomic(root.join(*rel.split(os.sep)), fh.read())


def resolve_defaults(cfg: EvaluateConfig) -> EvaluateConfig:
    """Fill ``family`` and ``tasks`` from the zoo's ``zoo_spec.json`` (its family and held-out tasks)
    when they are not given."""
    if not cfg.zoo:
        raise ConfigError("zoo: required (the zoo URI the generator learnt from)")
    if cfg.family and cfg.tasks:
        return cfg
    try:
        zoo = open_zoo(cfg.zoo)
    except ZooError as exc:
        raise ConfigError(f"zoo: {exc}") from exc

    try:
        spec, held_out = read_zoo_spec(zoo)
    except AdapterError as exc:
        missing = "family" if not cfg.family else "tasks"
        raise ConfigError(f"{missing}: not given and not readable from the zoo ({exc})") from exc
    return dataclasses.replace(cfg, family=cfg.family or spec.family, tasks=list(cfg.tasks) or held_out)


def validate(cfg: EvaluateConfig) -> None:
    """Everything checkable before work starts (raises ConfigError naming the field)."""
    if not cfg.zoo:
        raise ConfigError("zoo: required (the zoo URI the generator learnt from)")
    if not cfg.generator and not cfg.samples:
        raise ConfigError("generator: required (or samples: a sample-weights output folder)")
    if not cfg.tasks:
        raise ConfigError("tasks: at least one task condition to evaluate (default: the zoo's held-out tasks)")
    if not cfg.family:
        raise ConfigError("family: required (the task adapter family, e.g. dataset-subsets)")
    if not cfg.output:
        raise ConfigError("output: required (--output or --set output=...)")
    try:
        cfg.options()
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    try:
        zoo = open_zoo(cfg.zoo)
    except ZooError as exc:
        raise ConfigError(f"zoo: {exc}") from exc
    for c in cfg.tasks:
        try:
            make_adapter(cfg.family, c, zoo, _family_options(cfg))
        except AdapterError as exc:
            raise ConfigError(str(exc)) from exc
    if cfg.memorisation_tasks and not cfg.generator:
        raise ConfigError("memorisation_tasks: needs generator (fresh samples of the seen tasks)")
    for c in cfg.memorisation_tasks:
        if c not in zoo.conditions():
            raise ConfigError(f"memorisation_tasks: {c!r} is not a condition of the zoo (a seen task)")

    try:
        if cfg.samples:
            folder = FolderSampler(cfg.samples)
            for c in cfg.tasks:
                have = len(folder.by_condition.get(c, []))
                if have < cfg.num_samples:
                    raise ConfigError(f"samples: {cfg.samples} has {have} sample(s) for task {c!r}, "
                                      f"num_samples={cfg.num_samples}")
            sampler = folder
        else:
            sampler = load_sampler(cfg.generator, cfg.method, cfg.t, cfg.steps, device="cpu")
    except (SamplingError, LayoutError) as exc:
        key = "samples" if cfg.samples else "generator"
        raise ConfigError(f"{key}: {exc}") from exc
    if not sampler.layout.same_structure(zoo.layout):
        raise ConfigError(f"{'samples' if cfg.samples else 'generator'}: its layout does not match the zoo's "
                          f"({sampler.layout.num_blocks} vs {zoo.layout.num_blocks} blocks)")


def evaluate(cfg: EvaluateConfig, address: str | None = None, show_progress: bool = True,
             print_table: bool = True) -> dict:
    """Sample (unless ``cfg.samples``), evaluate every task, write the report; returns a summary
    ``{"tasks": {task_id: {init: {epoch0, final, ...}}}, "verdict": [...], "report": path}``."""
    cfg = resolve_defaults(cfg)
    validate(cfg)
    try:
        check_writable(cfg.output)
    except StorageError as exc:
        raise ConfigError(f"output: {exc}") from exc
    runtime.ray_init(address)
    samples_uri = cfg.samples
    if cfg.generator:
        samples_uri = resolve(cfg.output).join("samples").uri
        sample_weights(SampleConfig(generator=cfg.generator, conditions=list(cfg.tasks), num_samples=cfg.num_samples,
                                    method=cfg.method, t=cfg.t, steps=cfg.steps, seed=cfg.seed, output=samples_uri,
                                    concurrency=cfg.sample_concurrency, chunk_blocks=cfg.sample_chunk_blocks,
                                    label_conditions=True),
                       show_progress=show_progress)
    if cfg.parallel:
        remote = ray.remote(num_cpus=cfg.cpus_per_task, num_gpus=cfg.num_gpus)(_evaluate_one)
        results = ray.get([remote.remote(cfg, c, samples_uri, False) for c in cfg.tasks])
    else:
        results = [_evaluate_one(cfg, c, samples_uri, show_progress) for c in cfg.tasks]
    memo = []
    if cfg.memorisation_tasks:
        if cfg.parallel:
            remote_m = ray.remote(num_cpus=cfg.cpus_per_task, num_gpus=cfg.num_gpus)(_memorisation_one)
            memo = ray.get([remote_m.remote(cfg, c) for c in cfg.memorisation_tasks])
        else:
            memo = [_memorisation_one(cfg, c) for c in cfg.memorisation_tasks]
    header = {"zoo": cfg.zoo, "generator": cfg.generator or f"(samples reused from {cfg.samples})",
              "family": cfg.family, "sampling": (f"one-step direct recovery at t={cfg.t}" if cfg.method == "one_step"
                                                 else f"{cfg.method.upper()} with {cfg.steps} steps"),
              "N samples": cfg.num_samples, "fine-tuning epochs E": cfg.epochs, "seeds": cfg.seeds,
              "(e) noise": f"{cfg.noise_frac} x per-group std of the zoo weights, anchored on the "
                           f"{'nearest zoo checkpoint to generated sample 0' if cfg.noise_anchor == 'sample' else 'most similar task member'}",
              "(f) soup": "all reference members" if cfg.soup == "all" else "members of the most similar task"}
    out_root = resolve(cfg.output)
    if out_root.is_s3:
        with tempfile.TemporaryDirectory() as tmp:
            write_report(results, tmp, header, print_table, memorisation=memo)
            _publish(tmp, cfg.output)
    else:
        write_report(results, out_root.path, header, print_table, memorisation=memo)

    return {"tasks": {r.task_id: r.table for r in results}, "verdict": verdict_sentences(results),
            "samples": {r.task_id: r.samples for r in results},
            "memorisation": {r.task_id: r.memorisation for r in results},
            "zeng_memorisation": {m.task: m.to_dict() for m in memo},
            "report": out_root.join("report.md").uri}


@job_main
def main(argv: Sequence[str] | None = None) -> int:
    p = job_argparser("Fine-tune generated vs baseline initialisations on held-out tasks; write the report.",
                      config_required=False)
    args = p.parse_args(argv)
    cfg = load_config(EvaluateConfig, args.config, job_overrides(args))
    cfg = resolve_defaults(cfg)
    validate(cfg)
    summary = evaluate(cfg, args.address)
    print(f"report: {summary['report']}")
    return 0
