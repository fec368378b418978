"""Ray Tune sweeps over search spaces kept in ``tune_spaces/*.yaml``.

A space file names a base pipeline config, the metric/mode, a scheduler, trial resources and the
search space over *dotted config keys* of that pipeline config::

    name: block_size
    description: Denoised Weights Tab. 2 - block size
    base_config: jobs/configs/sweep_base.yaml
    metric: gen_accuracy
    mode: max
    num_samples: 1
    scheduler: {type: fifo}                       # or {type: asha, max_t: 4, grace_period: 1}
    resources_per_trial: {cpu: 0.5, gpu: 0}       # the trial's own driver; its stages run as
    max_concurrent_trials: 1                      # 0-CPU Ray tasks that claim their own resources
    fixed: {rounds: 4}                            # set in every trial (not searched)
    space:
      block_size: {grid_search: [128, 256, 512]}  # top-level knobs of PipelineConfig
      lr: {loguniform: [1.0e-4, 1.0e-2]}

Each trial applies its sampled values as ``--set`` overrides to the base config and runs
:func:`run_trial`, which runs the pipeline's stages (``rayweights.pipeline.Stages``): re-tokenises
the zoo when block size or grouping rule change, trains the generator (reporting per round for
ASHA), samples and scores the generated weights without fine-tuning, and reports the ablation
metric.  An interrupted sweep
resumes with ``Tuner.restore``.  Results: a table printed and saved (markdown + CSV) and a plot.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pandas as pd
import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from .config import (ConfigError, apply_overrides, check_override_key, from_dict, load_config, override_value,
                     read_yaml)
from .errors import job_main
from .evaluation import make_adapter, score_samples
from .evaluation.cli import resolve_defaults
from .evaluation.report import summary_metrics
from .fmt import cell
from .pipeline import PipelineConfig, Stages, check_stages, layout_metrics, load_pipeline_config, train_metrics
from .pipeline.config import abs_output
from . import runtime           # runtime.ray_init at call time: tests can forbid starting Ray
from .sampling import load_sampler
from .storage import StorageError, check_writable, exists, join, read_bytes, resolve, write_bytes_atomic
from .table import open_zoo
from .train.config import resolved_stage

log = logging.getLogger(__name__)

_DISTRIBUTIONS = ("grid_search", "choice", "uniform", "loguniform", "randint", "quniform")


@dataclass
class SchedulerSpec:
    type: str = "fifo"
    max_t: int = 10
    grace_period: int = 1
    reduction_factor: int = 3

    def __post_init__(self):
        if self.type not in ("fifo", "asha"):
            raise ValueError(f"scheduler.type: {self.type!r} is not one of fifo, asha")


@dataclass
class ResourcesSpec:
    cpu: float = 1.0
    gpu: float = 0.0


@dataclass
class SweepSpace:
    name: str
    base_config: str
    metric: str
    mode: str = "max"
    description: str = ""
    num_samples: int = 1
    max_concurrent_trials: int = 0
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    resources_per_trial: ResourcesSpec = field(default_factory=ResourcesSpec)
    space: dict[str, dict[str, Any]] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode: {self.mode!r} is not min or max")
        if not self.space:
            raise ValueError("space: empty search space")
        for key, dist in self.space.items():
            if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in _DISTRIBUTIONS:
                raise ValueError(f"space.{key}: expected one of {{{', '.join(_DISTRIBUTIONS)}: ...}}, got {dist!r}")
            kind, arg = next(iter(dist.items()))
            if kind in ("grid_search", "choice") and (not isinstance(arg, list) or not arg):
                raise ValueError(f"space.{key}.{kind}: expected a non-empty list")
            if kind in ("uniform", "loguniform", "randint") and (not isinstance(arg, list) or len(arg) != 2):
                raise ValueError(f"space.{key}.{kind}: expected [low, high]")
            if kind == "loguniform" and not (0 < float(arg[0]) < float(arg[1])):
                raise ValueError(f"space.{key}.loguniform: need 0 < low < high")


def load_space(path: str | os.PathLike, overrides=()) -> SweepSpace:
    for item in overrides or ():
        if "=" in item:
            check_override_key(SweepSpace, item.split("=", 1)[0].strip())
    data = apply_overrides(read_yaml(path), overrides)
    try:
        space = from_dict(SweepSpace, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    base = Path(space.base_config)
    if not base.is_absolute():
        cand = [Path(path).parent / base, Path.cwd() / base, Path(__file__).resolve().parents[1] / base]
        found = next((c for c in cand if c.is_file()), None)
        if found is None:
            raise ConfigError(f"{path}: base_config {space.base_config!r} not found")
        space = dataclasses.replace(space, base_config=str(found.resolve()))
    _check_keys(space, path)
    return space


def _example_value(dist: dict) -> Any:
    kind, arg = next(iter(dist.items()))
    if kind in ("grid_search", "choice"):
        return arg[0]
    if kind == "randint":
        return int(arg[0])
    return float(arg[0])


def _check_keys(space: SweepSpace, path) -> None:
    """Fail at load time, not in trial N, when a searched or fixed key is not a field of the base
    pipeline config (or its value has the wrong type): one value per key goes through the same
    strict loader the trials use."""
    items = [("fixed", k, v) for k, v in space.fixed.items()]
    items += [("space", k, _example_value(d)) for k, d in space.space.items()]
    for section, key, value in items:
        try:
            load_config(PipelineConfig, space.base_config, [f"{key}={override_value(value)}"])
        except ConfigError as exc:
            raise ConfigError(f"{path}: {section}.{key}: not a valid key/value of the base config "
                              f"{space.base_config} ({exc})") from exc
    # the values *inside* the stage overrides (fixed.zoo_set / train_set / eval_set) and the stage
    # configs they produce: checked on one trial config (every fixed value, each searched key's first value)
    trial = [f"{k}={override_value(v)}" for k, v in space.fixed.items()]
    trial += [f"{k}={override_value(_example_value(d))}" for k, d in space.space.items()]
    try:
        check_stages(load_config(PipelineConfig, space.base_config, trial))
    except (ConfigError, ValueError) as exc:
        raise ConfigError(f"{path}: fixed/space: a trial config is invalid: {exc}") from exc


def to_tune_space(space: SweepSpace) -> dict:
    out = {}
    for key, dist in space.space.items():
        kind, arg = next(iter(dist.items()))
        if kind == "grid_search":
            out[key] = tune.grid_search(list(arg))
        elif kind == "choice":
            out[key] = tune.choice(list(arg))
        elif kind == "uniform":
            out[key] = tune.uniform(float(arg[0]), float(arg[1]))
        elif kind == "loguniform":
            out[key] = tune.loguniform(float(arg[0]), float(arg[1]))
        elif kind == "randint":
            out[key] = tune.randint(int(arg[0]), int(arg[1]))
        elif kind == "quniform":
            out[key] = tune.quniform(float(arg[0]), float(arg[1]), float(arg[2]))
    return out


# ----------------------------------------------------------------------------- one trial
_TRAINED = "trained.json"        # <trial>/trained.json: the trial's generator finished all its rounds


def _mean(values) -> float:
    v = [float(x) for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(v) / len(v) if v else math.nan


def _score_round(st: Stages) -> dict[str, Any]:
    """Metric of the generated weights without fine-tuning on the held-out tasks (intermediate rounds)."""
    ecfg = resolve_defaults(st.ecfg)
    zoo = open_zoo(st.zoo)
    sampler = load_sampler(st.export, ecfg.method, ecfg.t, ecfg.steps, device="cpu")
    avgs, bests, metric = [], [], "metric"
    t0 = time.perf_counter()
    for c in ecfg.tasks:
        adapter = make_adapter(ecfg.family, c, zoo, dict(ecfg.family_options))
        s = score_samples(adapter, sampler, ecfg.num_samples, seed=ecfg.seed)
        avgs.append(s["avg"])
        bests.append(s["best"])
        metric = adapter.metric
    n = max(1, len(ecfg.tasks) * ecfg.num_samples)
    return {f"gen_{metric}": _mean(avgs), f"gen_{metric}_best": _mean(bests), "metric": metric,
            "sample_seconds": (time.perf_counter() - t0) / n}


def _trial_rounds(cfg: PipelineConfig, show_progress: bool) -> Iterator[dict]:
    """The trial's work; yields the metrics of each round (the last one after the full evaluation).

    With ``rounds: R > 1`` the generator's last stage trains in R rounds of ``steps / R``, each
    continuing the previous one from its latest checkpoint (the trainer's ``extend_last_stage``);
    a restarted trial whose rounds had all finished goes straight to the evaluation, any other
    restarted trial starts its (own) generator over."""
    runtime.ray_init(None)
    st = Stages(cfg, None, show_progress)
    t0 = time.perf_counter()
    st.build_zoo()
    layout = layout_metrics(st.zoo)
    if cfg.rounds > 1:
        total = int(resolved_stage(st.tcfg, st.last_stage())["steps"])
        marker = resolve(st.output).join(_TRAINED)
        finished = exists(marker) and json.loads(read_bytes(marker)) == {"run": st.run_uri, "steps": total}
        if not finished:
            st.discard_generator()
            for r in range(1, cfg.rounds):
                tres = st.train(steps_of_last=max(1, math.ceil(total * r / cfg.rounds)), extend=True)
                yield {**_score_round(st), **train_metrics(tres), **layout, "round": r,
                       "seconds": time.perf_counter() - t0}
        tres = st.train(steps_of_last=total, extend=True)
        write_bytes_atomic(marker, json.dumps({"run": st.run_uri, "steps": total}).encode())
    else:
        tres = st.train()
    results = st.evaluate()
    yield {**summary_metrics(results), **train_metrics(tres), **layout, "round": cfg.rounds,
           "seconds": time.perf_counter() - t0, "report": resolve(st.eval_dir).join("report.md").uri}


def run_trial(base_config: str, overrides: Sequence[str], trial_dir: str,
              report: Callable[[dict], Any] | None = None, show_progress: bool = False) -> dict:
    """One Tune trial: the pipeline of ``base_config`` + ``overrides`` with its output in ``trial_dir``.

    Stage folders are shared between the trials of a sweep (``<trial_dir>/../_shared`` unless the
    config sets ``cache``), keyed by each stage's effective config: trials that differ only in
    ``one_step_t`` share one generator, trials that differ only in block size share the zoo's
    members.  ``report(metrics)`` is called after each of the ``rounds`` training rounds (for ASHA;
    intermediate rounds score the generated weights only: ``gen_<metric>`` is the mean over held-out
    tasks of the average over the N samples) and after the final evaluation; the final metrics are
    returned (and written to ``<trial_dir>/metrics.json``).

    Inside a Tune trial (a placement group of the trial's resources) the stages run in a 0-CPU Ray
    task scheduled outside that group, so their own tasks, actors and Ray Train workers take the
    cluster's free resources instead of having to fit in the trial's bundle."""
    trial_dir = abs_output(trial_dir)
    cfg = load_pipeline_config(base_config, list(overrides) + [f"output={override_value(trial_dir)}"])
    if not cfg.cache:
        cfg = dataclasses.replace(cfg, cache=os.path.join(os.path.dirname(trial_dir.rstrip("/")), "_shared"))
    check_stages(cfg)
    report = report or (lambda m: None)
    runtime.ray_init(None)
    metrics: dict = {}
    if ray.util.get_current_placement_group() is not None:
        task = ray.remote(num_cpus=0, scheduling_strategy="DEFAULT", max_retries=0)(_trial_rounds)
        for ref in task.remote(cfg, show_progress):
            metrics = ray.get(ref)
            report(metrics)
    else:
        for metrics in _trial_rounds(cfg, show_progress):
            report(metrics)
    write_bytes_atomic(resolve(trial_dir).join("metrics.json"), json.dumps(metrics, indent=1, default=str).encode())
    return metrics


def _trainable(params: dict, base_config: str, fixed: dict, output_root: str):
    """One Tune trial: :func:`run_trial` with this trial's overrides."""
    overrides = [f"{k}={override_value(v)}" for k, v in {**fixed, **params}.items()]
    trial_dir = join(output_root, "trials", tune.get_context().get_trial_id())
    run_trial(base_config, overrides, trial_dir, report=tune.report)


def check_output(output: str) -> str:
    """The sweep's output URI (local folders made absolute), probed for writing before Ray starts."""
    output = os.path.abspath(output) if "://" not in output else output
    try:
        check_writable(output)
    except StorageError as exc:
        raise ConfigError(f"--output: {exc}") from exc
    return output


def run_sweep(space: SweepSpace, output: str, address: str | None = None, resume: bool = True):
    """Run (or resume) the sweep; returns (results DataFrame, paths written)."""
    output = check_output(output)
    runtime.ray_init(address)
    trainable = tune.with_resources(
        functools.partial(_trainable, base_config=space.base_config, fixed=space.fixed, output_root=output),
        {"cpu": space.resources_per_trial.cpu, "gpu": space.resources_per_trial.gpu})
    exp_path = join(output, space.name)
    if resume and tune.Tuner.can_restore(exp_path):
        log.info("resuming sweep %s from %s", space.name, exp_path)
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_errored=True)
    else:
        if space.scheduler.type == "asha":
            sched = ASHAScheduler(time_attr="training_iteration", max_t=space.scheduler.max_t,
                                  grace_period=space.scheduler.grace_period,
                                  reduction_factor=space.scheduler.reduction_factor)
        else:
            sched = FIFOScheduler()
        tuner = tune.Tuner(
            trainable,
            param_space=to_tune_space(space),
            tune_config=tune.TuneConfig(metric=space.metric, mode=space.mode, scheduler=sched,
                                        num_samples=space.num_samples,
                                        max_concurrent_trials=space.max_concurrent_trials or None),
            run_config=tune.RunConfig(name=space.name, storage_path=output, verbose=1),
        )
    grid = tuner.fit()
    return write_results(space, grid, output)


def write_results(space: SweepSpace, grid, output: str):
    import matplotlib             # the plotting backend is chosen only where a plot is made

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for res in grid:
        m = res.metrics or {}
        row = {k: (res.config or {}).get(k) for k in space.space}
        row[space.metric] = m.get(space.metric)
        for extra in ("gen_loss", "ae_loss", "sample_seconds", "num_blocks", "training_iteration"):
            if extra in m:
                row[extra] = m[extra]
        row["status"] = "error" if res.error else "ok"
        rows.append(row)
    df = pd.DataFrame(rows)
    if space.metric in df and df[space.metric].notna().any():
        df = df.sort_values(space.metric, ascending=(space.mode == "min"), na_position="last")
    cols = list(df.columns)         # our own markdown (pandas' to_markdown needs the optional tabulate)
    md = "\n".join(["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
                   + ["| " + " | ".join(cell(v, 4, "g") for v in row) + " |" for row in df.itertuples(index=False)])
    title = f"## Sweep `{space.name}`: {space.description or ''} (metric {space.metric}, {space.mode})\n\n"
    text = title + md + "\n"

    paths = {"markdown": join(output, f"{space.name}_results.md"),
             "csv": join(output, f"{space.name}_results.csv"),
             "plot": join(output, f"{space.name}_results.png")}
    write_bytes_atomic(resolve(paths["csv"]), df.to_csv(index=False).encode())
    keys = list(space.space)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if len(df) and space.metric in df:
        x = df[keys].astype(str).agg(", ".join, axis=1)
        ax.bar(range(len(df)), df[space.metric].astype(float), color="tab:blue")
        ax.set_xticks(range(len(df)))
        ax.set_xticklabels(x, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(space.metric)
    ax.set_title(f"{space.name}: {', '.join(keys)}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    write_bytes_atomic(resolve(paths["plot"]), buf.getvalue())
    write_bytes_atomic(resolve(paths["markdown"]), text.encode())     # the results table last: the "done" marker
    print(text)
    return df, paths


@job_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="sweep", description="Ray Tune sweep over a tune_spaces/*.yaml space")
    p.add_argument("--space", required=True, help="tune_spaces/<name>.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the space file (e.g. num_samples=4)")
    p.add_argument("--output", default="runs/sweeps", help="where trials, results table and plot go")
    p.add_argument("--address", default=None)
    p.add_argument("--fresh", action="store_true", help="do not resume an earlier run of this sweep")
    a = p.parse_args(argv)
    space = load_space(a.space, a.overrides)
    check_output(a.output)                      # before Ray starts
    df, paths = run_sweep(space, a.output, a.address, resume=not a.fresh)
    print(f"results: {paths['markdown']}  plot: {paths['plot']}")
    return 0 if (df["status"] == "ok").any() else 1
