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
:func:`rayweights.pipeline.run_trial`, which re-tokenises the zoo when block size or grouping
rule change, trains the generator (reporting per round for ASHA), samples and scores the
generated weights without fine-tuning, and reports the ablation metric.  An interrupted sweep
resumes with ``Tuner.restore``.  Results: a table printed and saved (markdown + CSV) and a plot.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ConfigError, from_dict, read_yaml
from .errors import job_main

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
    from .config import _check_override_key, apply_overrides

    for item in overrides or ():
        if "=" in item:
            _check_override_key(SweepSpace, item.split("=", 1)[0].strip())
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
    from .config import load_config, override_value
    from .pipeline import PipelineConfig, check_stages

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
    from ray import tune

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


def _trainable(params: dict, base_config: str, fixed: dict, output_root: str):
    """One Tune trial: the pipeline's trial runner with this trial's overrides."""
    from ray import tune

    from .pipeline import run_trial

    from .config import override_value

    overrides = [f"{k}={override_value(v)}" for k, v in {**fixed, **params}.items()]
    from .storage import join

    trial_dir = join(output_root, "trials", tune.get_context().get_trial_id())
    run_trial(base_config, overrides, trial_dir, report=tune.report)


def check_output(output: str) -> str:
    """The sweep's output URI (local folders made absolute), probed for writing before Ray starts."""
    from .storage import StorageError, check_writable

    output = os.path.abspath(output) if "://" not in output else output
    try:
        check_writable(output)
    except StorageError as exc:
        raise ConfigError(f"--output: {exc}") from exc
    return output


def run_sweep(space: SweepSpace, output: str, address: str | None = None, resume: bool = True):
    """Run (or resume) the sweep; returns (results DataFrame, paths written)."""
    import functools

    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from .runtime import ray_init

    output = check_output(output)
    ray_init(address)
    trainable = tune.with_resources(
        functools.partial(_trainable, base_config=space.base_config, fixed=space.fixed, output_root=output),
        {"cpu": space.resources_per_trial.cpu, "gpu": space.resources_per_trial.gpu})
    from .storage import join

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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

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
    from .fmt import cell

    cols = list(df.columns)         # our own markdown (pandas' to_markdown needs the optional tabulate)
    md = "\n".join(["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
                   + ["| " + " | ".join(cell(v, 4, "g") for v in row) + " |" for row in df.itertuples(index=False)])
    title = f"## Sweep `{space.name}`: {space.description or ''} (metric {space.metric}, {space.mode})\n\n"
    text = title + md + "\n"
    from .storage import join, resolve, write_bytes_atomic

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
    import argparse

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
