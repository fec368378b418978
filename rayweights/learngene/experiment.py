"""The learngene comparison: pretrain a source, extract its learngene, then for every target size
train from random init ("scratch": its value at the step budget is *random init*, at the end of
the run *direct pretraining*) and from the learngene ("fine": Σ-only phase on a subset, then full
training; "fine_nosigma": learngene init straight into full training), one Ray task per
(size, method, seed).  The summary gives the metric at the fixed budget, steps to the target,
total training steps for N sizes and the storage of learngenes vs N separate models.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Sequence

import ray
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn
from tqdm.auto import tqdm

from ..config import from_dict, to_dict
from ..device import torch_device
from ..runtime import ray_init
from ..storage import exists, join, read_bytes, resolve, write_bytes_atomic
from .build import collect_learngene, init_from_learngene, materialize, sigma_phase_parameters
from .factor import Learngene, extract
from .layers import LearngeneError, match_layer_types
from .models import ModelFamily, get_model_family, import_constructor
from .report import plot_curves, render_markdown
from .spec import LearngeneConfig, SizeSpec
from .tasks import LearngeneTask, make_task, train_steps

__all__ = ["LearngenePlan", "plan_learngene", "run_learngene", "run_source", "run_target", "summarize", "resolve_model_family"]


def resolve_model_family(cfg: LearngeneConfig) -> ModelFamily:
    """The registered family with the config's overrides, or a custom constructor's family."""
    base = get_model_family(cfg.family) if cfg.family else None
    if cfg.constructor:
        build = import_constructor(cfg.constructor)
        return ModelFamily(cfg.constructor, cfg.task.kind or base.task, list(cfg.layer_types) or base.layer_types, build,
                      dict(cfg.family_options), f"custom constructor {cfg.constructor}",
                      base.unwrap if base else None)
    return dataclasses.replace(base, task=cfg.task.kind or base.task,
                               layer_types=list(cfg.layer_types) or base.layer_types,
                               defaults={**base.defaults, **cfg.family_options})


def build_task(cfg: LearngeneConfig, family: ModelFamily) -> LearngeneTask:
    opts = dict(cfg.task.options)
    opts.setdefault("batch_size", cfg.train.batch_size)
    try:
        return make_task(family.task, **opts)
    except TypeError as exc:
        raise LearngeneError(f"task.options: {exc}") from None


def _device(spec: str) -> torch.device:
    try:
        return torch_device(spec)
    except ValueError as exc:
        raise LearngeneError(str(exc)) from None


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class LearngenePlan:
    """Everything checked before any training: family, task, every size builds and runs a batch,
    layer types match the source and are compatible with each target."""

    cfg: LearngeneConfig
    family: ModelFamily
    metric: str
    higher_is_better: bool
    params: dict[str, int]


def plan_learngene(cfg: LearngeneConfig) -> LearngenePlan:
    family = resolve_model_family(cfg)
    task = build_task(cfg, family)
    sizes = [SizeSpec("source", cfg.source.size), *cfg.targets]
    batch = next(task.batches(1.0, 0))
    batch = tuple(b[:2] if b is not None else None for b in batch)
    params, source_matches = {}, None
    for spec in sizes:
        where = "source" if spec.name == "source" else f"targets[{spec.name}]"
        try:
            model = family.construct(spec.size)
        except LearngeneError as exc:
            raise LearngeneError(f"{where}: {exc}") from None
        try:
            with torch.no_grad():
                task.loss(model, batch)
        except Exception as exc:  # shape mismatches between the size and the task's data
            raise LearngeneError(f"{where}: size {spec.size} does not run on the task's data: {exc}") from None
        params[spec.name] = _num_params(model)
        matches = match_layer_types(dict(model.named_parameters()), family.types_for(model), where=where,
                                    require_all=spec.name == "source")
        if source_matches is None:
            source_matches = matches
            unknown = sorted(set(cfg.extract.ranks) - set(matches))
            if unknown:
                raise LearngeneError(f"extract.ranks: unknown layer type(s) {', '.join(unknown)}")
            continue
        for name, mt in matches.items():
            src = source_matches.get(name)
            if src is not None and src.in_shape[1:] != mt.in_shape[1:]:
                raise LearngeneError(f"{where}: layer type {name!r} has kernel {mt.in_shape[1:]}, the source "
                                     f"{src.in_shape[1:]}; only widths and depth may differ")
            if src is not None and (len(src.out_split), len(src.in_split)) != (len(mt.out_split), len(mt.in_split)):
                raise LearngeneError(f"{where}: layer type {name!r} has {len(mt.out_split)}/{len(mt.in_split)} "
                                     f"out/in segments, the source {len(src.out_split)}/{len(src.in_split)}")
    if cfg.source.weights:
        if not exists(resolve(cfg.source.weights)):
            raise LearngeneError(f"source.weights: {cfg.source.weights} not found")
    return LearngenePlan(cfg, family, task.metric, task.higher_is_better, params)


def _curve(points) -> list[dict]:
    return [{"step": p.step, "seconds": round(p.seconds, 3), **p.metrics} for p in points]


def _setup_worker(cfg: LearngeneConfig):
    threads = max(1, int(cfg.resources.num_cpus))
    torch.set_num_threads(threads)
    family = resolve_model_family(cfg)
    return family, build_task(cfg, family), _device(cfg.device)


def run_source(cfg_dict: dict) -> dict:
    """Pretrain (or load) the source and extract its learngene (+ optional learngene learning)."""
    cfg = from_dict(LearngeneConfig, cfg_dict)
    family, task, device = _setup_worker(cfg)
    torch.manual_seed(cfg.seeds[0])
    model = family.construct(cfg.source.size)
    curve = []
    if cfg.source.weights:
        sd = st_load(read_bytes(resolve(cfg.source.weights)))
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise LearngeneError(f"source.weights: {cfg.source.weights} does not fit the source size "
                                 f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        model.to(device)
        curve = _curve(train_steps(model, task, 0, lr=cfg.source.lr, device=device))
    else:
        curve = _curve(train_steps(model, task, cfg.source.steps, lr=cfg.source.lr,
                                   weight_decay=cfg.train.weight_decay, eval_every=cfg.train.eval_every,
                                   seed=cfg.seeds[0], device=device))
    model.cpu()
    source_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    types = family.types_for(model)
    desc = {"family": family.name, "size": cfg.source.size, "steps": cfg.source.steps,
            "metric": {task.metric: curve[-1][task.metric]}, "config": cfg.name}
    lg = extract(model, types, mode=cfg.extract.mode, rank=cfg.extract.rank, energy=cfg.extract.energy,
                 als_iters=cfg.extract.als_iters, ranks=cfg.extract.ranks, source=desc)
    learn_curve = []
    if cfg.extract.learn_steps:
        rep = init_from_learngene(model, lg, layer_types=types, factorized=True, train_factors=True)
        learn_curve = _curve(train_steps(model, task, cfg.extract.learn_steps, lr=cfg.extract.learn_lr,
                                         eval_every=cfg.train.eval_every, seed=cfg.seeds[0], device=device))
        model.cpu()
        desc["learn_steps"] = cfg.extract.learn_steps
        desc["learned_metric"] = {task.metric: learn_curve[-1][task.metric]}
        lg = collect_learngene(model, rep, lg, source=desc)
    return {"learngene": lg, "state_dict": source_state, "curve": curve, "learn_curve": learn_curve,
            "params": _num_params(family.construct(cfg.source.size))}


def _export_state(family: ModelFamily, model: nn.Module) -> dict:
    inner = family.unwrap(model) if family.unwrap else model
    cfg = getattr(inner, "config", None)
    config = dict(cfg) if isinstance(cfg, dict) else None
    return {"state_dict": {k: v.detach().cpu().clone().contiguous() for k, v in inner.state_dict().items()},
            "config": json.loads(json.dumps(config, default=list)) if config is not None else None,
            "class_name": type(inner).__name__}


def run_target(cfg_dict: dict, size: dict, method: str, seed: int, learngene: Learngene | None,
               export: bool = False) -> dict:
    """One training run of one size from one initialisation; returns its curve."""
    cfg = from_dict(LearngeneConfig, cfg_dict)
    spec = from_dict(SizeSpec, size)
    family, task, device = _setup_worker(cfg)
    torch.manual_seed(seed)
    model = family.construct(spec.size)
    out: dict[str, Any] = {"size": spec.name, "method": method, "seed": seed, "params": _num_params(model)}
    T, budget, ev = cfg.train.steps, cfg.train.budget, cfg.train.eval_every
    common = dict(weight_decay=cfg.train.weight_decay, eval_every=ev, seed=seed, device=device)
    if method == "scratch":
        curve = train_steps(model, task, T, lr=cfg.train.lr, extra_eval=[budget], **common)
    else:
        sig = cfg.sigma_phase.steps if method == "fine" else 0
        rep = init_from_learngene(model, learngene, layer_types=family.types_for(model), depth=cfg.init.depth,
                                  extend=cfg.init.extend, rescale_fan_in=cfg.init.rescale_fan_in,
                                  factorized=sig > 0, seed=seed)
        out["init"] = {"initialised": rep.num_initialised, "default": len(rep.default),
                       "unmatched_genes": rep.unmatched_genes, "uncovered_types": rep.uncovered_types}
        curve = []
        if sig:
            trainable = sigma_phase_parameters(model, cfg.sigma_phase.train_norms, cfg.sigma_phase.extra_trainable)
            named = dict(model.named_parameters())
            out["sigma_params"] = sum(named[n].numel() for n in trainable if n.endswith(".original"))
            out["sigma_trainable"] = sum(named[n].numel() for n in trainable)
            curve += train_steps(model, task, sig, lr=cfg.sigma_phase.lr, subset=cfg.sigma_phase.subset,
                                 extra_eval=[budget], **common)
            materialize(model)
        if export:
            out["export"] = _export_state(family, model.cpu())
        curve += train_steps(model, task, T - sig, lr=cfg.train.lr, start_step=sig, eval_at_start=not sig,
                             extra_eval=[budget], **common)
    out["curve"] = _curve(curve)
    return out


# ---------------------------------------------------------------------------------------------
def _reached(v: float, target: float, higher: bool) -> bool:
    return v is not None and not math.isnan(v) and (v >= target if higher else v <= target)


def _mean_curve(runs: list[dict], metric: str) -> tuple[list[int], list[float]]:
    steps = [p["step"] for p in runs[0]["curve"]]
    vals = [sum(r["curve"][i][metric] for r in runs) / len(runs) for i in range(len(steps))]
    return steps, vals


def _at(steps: list[int], vals: list[float], step: int) -> float | None:
    return vals[steps.index(step)] if step in steps else None


def summarize(plan: LearngenePlan, source: dict, runs: Sequence[dict], learngene: Learngene) -> dict:
    cfg, metric, higher = plan.cfg, plan.metric, plan.higher_is_better
    sign = 1 if higher else -1
    sizes = []
    for spec in cfg.targets:
        entry: dict[str, Any] = {"name": spec.name, "size": spec.size, "params": plan.params[spec.name],
                                 "curves": {}, "at_budget": {}, "final": {}, "steps_to_target": {}}
        for m in cfg.methods:
            rs = [r for r in runs if r["size"] == spec.name and r["method"] == m]
            if not rs:
                continue
            steps, vals = _mean_curve(rs, metric)
            entry["curves"][m] = {"steps": steps, "values": vals}
            entry["at_budget"][m] = _at(steps, vals, cfg.train.budget)
            entry["final"][m] = vals[-1]
            if "sigma_params" in rs[0]:
                entry["sigma_params"] = rs[0]["sigma_params"]
            if "init" in rs[0]:
                entry["init"] = rs[0]["init"]
        sc = entry["final"]["scratch"]
        if cfg.target.kind == "direct":
            target = sc - sign * cfg.target.tolerance
        elif cfg.target.kind == "random_at_budget":
            target = entry["at_budget"]["scratch"] - sign * cfg.target.tolerance
        else:
            target = float(cfg.target.value)
        entry["target"] = target
        for m, c in entry["curves"].items():
            entry["steps_to_target"][m] = next((s for s, v in zip(c["steps"], c["values"])
                                                if _reached(v, target, higher)), None)
        a, b = entry["steps_to_target"].get("scratch"), entry["steps_to_target"].get("fine")
        entry["speedup"] = (a / b if b else math.inf) if a is not None and b is not None else None
        sizes.append(entry)

    fine_key = "fine" if "fine" in cfg.methods else "fine_nosigma"
    n = len(sizes)
    scratch_steps = [s["steps_to_target"]["scratch"] for s in sizes]
    fine_steps = [s["steps_to_target"].get(fine_key) for s in sizes]
    source_cost = (0 if cfg.source.weights else cfg.source.steps) + cfg.extract.learn_steps
    totals = {
        "sizes": n,
        "direct_steps": sum(x if x is not None else cfg.train.steps for x in scratch_steps),
        "direct_steps_full": n * cfg.train.steps,
        "fine_steps": None if any(x is None for x in fine_steps) else source_cost + sum(fine_steps),
        "fine_sizes_reached": sum(x is not None for x in fine_steps),
        "source_steps": source_cost,
    }
    if totals["fine_steps"]:
        totals["step_ratio"] = totals["direct_steps"] / totals["fine_steps"]
    sigma_bytes = 4 * sum(s.get("sigma_params", 0) for s in sizes)
    storage = {"learngene_bytes": learngene.num_bytes(), "learngene_uv_bytes": learngene.num_bytes(with_sigma=False),
               "models_bytes": 4 * sum(s["params"] for s in sizes), "sigma_bytes": sigma_bytes,
               "source_bytes": 4 * source["params"]}
    storage["ratio"] = storage["models_bytes"] / max(1, storage["learngene_bytes"])
    storage["ratio_with_sigmas"] = storage["models_bytes"] / max(1, storage["learngene_uv_bytes"] + sigma_bytes)
    return {"name": cfg.name, "family": plan.family.name, "metric": metric, "higher_is_better": higher,
            "budget": cfg.train.budget, "steps": cfg.train.steps, "sigma_steps": cfg.sigma_phase.steps,
            "methods": list(cfg.methods), "seeds": list(cfg.seeds), "target": to_dict(cfg.target),
            "source": {"size": cfg.source.size, "params": source["params"], "curve": source["curve"],
                       "learn_curve": source["learn_curve"]},
            "learngene": learngene.describe(), "sizes": sizes, "totals": totals, "storage": storage,
            "config": to_dict(cfg)}


# ---------------------------------------------------------------------------------------------
def _write_outputs(plan: LearngenePlan, out_uri: str, summary: dict, exports: dict[str, dict], source_state: dict) -> dict:
    files = {}

    def put(rel: str, data: bytes):
        write_bytes_atomic(resolve(join(out_uri, rel)), data)
        files[rel] = join(out_uri, rel)

    put("source/model.safetensors", st_save({k: v.contiguous() for k, v in source_state.items()},
                                         metadata={"size": json.dumps(plan.cfg.source.size)}))
    for name, ex in exports.items():
        sd = ex["state_dict"]
        if ex["config"] is not None:   # a diffusers model: save_pretrained layout (from_pretrained loads it)
            put(f"inits/{name}/diffusion_pytorch_model.safetensors", st_save(sd))
            cfgd = {"_class_name": ex["class_name"], **{k: v for k, v in ex["config"].items()
                                                         if not k.startswith("_")}}
            put(f"inits/{name}/config.json", json.dumps(cfgd, indent=2).encode())
        else:
            put(f"inits/{name}/model.safetensors", st_save(sd, metadata={"size": json.dumps(
                next(t.size for t in plan.cfg.targets if t.name == name))}))
    with tempfile.TemporaryDirectory() as tmp:
        png = plot_curves(summary, os.path.join(tmp, "curves.png"))
        with open(png, "rb") as f:
            put("curves.png", f.read())
    summary["files"] = dict(files, **{"report.md": join(out_uri, "report.md"),
                                      "results.json": join(out_uri, "results.json"),
                                      "learngene": join(out_uri, "learngene")})
    put("results.json", json.dumps(summary, indent=2, default=float).encode())
    put("report.md", render_markdown(summary).encode())
    return summary


def run_learngene(plan: LearngenePlan, output: str, address: str | None = None, progress: bool = True) -> dict:
    """Run the whole comparison for a prepared plan; writes the learngene, per-size FINE inits,
    ``results.json``, ``report.md`` and ``curves.png`` under ``output``; returns the summary."""
    cfg = plan.cfg
    cfg_dict = to_dict(cfg)
    jobs = [(to_dict(t), m, s) for t in cfg.targets for m in cfg.methods for s in cfg.seeds]
    first_fine = "fine" if "fine" in cfg.methods else None
    if cfg.parallel:
        ray_init(address)
        opts = {"num_cpus": cfg.resources.num_cpus, "num_gpus": cfg.resources.num_gpus, "max_retries": 0}
        src_fn = ray.remote(**opts)(run_source)
        tgt_fn = ray.remote(**opts)(run_target)
        source = ray.get(src_fn.remote(cfg_dict))
        lg_ref = ray.put(source["learngene"])
        refs = {tgt_fn.remote(cfg_dict, t, m, s, lg_ref if m != "scratch" else None,
                              export=cfg.export_inits and m == first_fine and s == cfg.seeds[0]): (t, m, s)
                for t, m, s in jobs}
        runs, pending = [], list(refs)
        with tqdm(total=len(pending), desc=f"learngene {cfg.name}", disable=not progress) as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                runs.append(ray.get(done[0]))
                bar.update(1)
    else:
        source = run_source(cfg_dict)
        runs = [run_target(cfg_dict, t, m, s, source["learngene"] if m != "scratch" else None,
                           export=cfg.export_inits and m == first_fine and s == cfg.seeds[0])
                for t, m, s in tqdm(jobs, desc=f"learngene {cfg.name}", disable=not progress)]
    lg: Learngene = source["learngene"]
    lg.save(join(output, "learngene"))
    summary = summarize(plan, source, runs, lg)
    exports = {r["size"]: r.pop("export") for r in runs if "export" in r}
    summary["runs"] = [{k: v for k, v in r.items()} for r in runs]
    return _write_outputs(plan, output, summary, exports, source["state_dict"])
