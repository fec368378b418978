"""The whole pipeline in one call: zoo spec -> zoo tables -> generator -> samples -> evaluation report.

``run_pipeline(PipelineConfig())`` (``python jobs/run_all.py``) builds the zoo of ``zoo_spec``,
trains the generator of ``generator`` on it, samples weights for the zoo's held-out tasks from the
generator export, fine-tunes them against the baselines (``rayweights.evaluation``) and prints the
comparison table with the paths of the report and its plots.  Each stage calls the stage's own
public API (``build_zoo``, ``train_generator``, ``evaluate``) on one Ray session.

Stage outputs live under ``<cache>`` (default: ``<output>``) in folders named after a hash of the
stage's effective config (``zoo-<h>``, ``zoo-<h>-b<block>-r<rule>``, ``gen-<h>``, ``eval-<h>``), so
re-running reuses every finished stage (the zoo builder and trainer also resume unfinished ones)
and a changed setting never silently reuses a stale stage.  ``<output>/summary.{md,json}`` hold
the last run's table, metrics and paths.

Trial knobs (``None`` = the stage config's own value), for sweeps (``tune_spaces/*.yaml``):

| key | goes to |
|---|---|
| ``block_size``, ``rule`` | the zoo layout: the built zoo is re-tokenised (:func:`retokenize_zoo`), members are not retrained |
| ``input_noise``, ``latent_noise`` | ``model.autoencoder.{input,latent}_noise`` of the train config (p-diff) |
| ``max_timestep`` | ``scheduler.num_train_timesteps`` of the train config |
| ``lr`` | ``lr`` of the train config and of every stage that sets its own |
| ``one_step_t`` | ``t`` of the evaluation's one-step sampling (``method: one_step``) |

:func:`run_trial` runs the pipeline for one Ray Tune trial (``rayweights.sweep``) and reports the
metrics of the generated weights without fine-tuning (``gen_accuracy``: mean over held-out tasks
of the average over the N samples).  With ``rounds: R > 1`` it trains the generator's last stage in
R rounds of ``steps / R`` (continuing from the previous round's checkpoint) and reports after each,
so ASHA can stop poor trials early.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .config import ConfigError, from_dict, load_config, override_value, read_yaml, to_dict
from .errors import JobFailed, expected, job_main

__all__ = ["PipelineConfig", "PipelineResult", "run_pipeline", "run_trial", "retokenize_zoo", "load_pipeline_config",
           "resolve_path", "DEFAULT_CONFIG_NOTE"]

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG_NOTE = ("p-diff on a partial digits zoo (ConvNet-3, last two BN layers generated), "
                       "two held-out tasks")


def _default_zoo_set() -> list[str]:
    return ['held_out=["digits:0,1,2,5,6", "digits:3,4,7,8,9"]']


def _default_train_set() -> list[str]:
    return ["batch_size=16", "stages.autoencoder.steps=200", "stages.diffusion.steps=500", "checkpoint_every=250"]


def _default_eval_set() -> list[str]:
    return ["t=100"]


@dataclass
class PipelineConfig:
    """The pipeline: three stage configs (paths), their ``--set`` overrides, and trial knobs."""

    zoo_spec: str = "jobs/specs/partial_bn.yaml"          # a ZooSpec YAML
    generator: str = "jobs/configs/pdiff_tiny.yaml"       # a GeneratorTrainConfig YAML
    output: str = "runs/pipeline"                         # summary.{md,json}; stage folders unless `cache`
    cache: str = ""                                       # stage folders (zoo-/gen-/eval-<hash>); "" = output
    zoo_set: list[str] = field(default_factory=_default_zoo_set)      # overrides of the zoo spec
    train_set: list[str] = field(default_factory=_default_train_set)  # overrides of the train config
    eval_set: list[str] = field(default_factory=_default_eval_set)    # overrides of the EvaluateConfig
    num_samples: int = 10                                 # N generated weight sets per held-out task
    epochs: int = 5                                       # E fine-tuning epochs in the evaluation
    rounds: int = 1                                       # run_trial: report after each of R training rounds
    # --- trial knobs (None = the stage config's value)
    block_size: int | None = None
    rule: int | None = None
    input_noise: float | None = None
    latent_noise: float | None = None
    max_timestep: int | None = None
    one_step_t: int | None = None
    lr: float | None = None

    def __post_init__(self):
        for name in ("zoo_spec", "generator", "output"):
            if not getattr(self, name):
                raise ValueError(f"{name}: required")
        if self.num_samples < 1:
            raise ValueError(f"num_samples: must be >= 1, got {self.num_samples}")
        if self.epochs < 1:
            raise ValueError(f"epochs: must be >= 1, got {self.epochs}")
        if self.rounds < 1:
            raise ValueError(f"rounds: must be >= 1, got {self.rounds}")
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"block_size: must be >= 1, got {self.block_size}")
        for name in ("input_noise", "latent_noise"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ValueError(f"{name}: must be >= 0, got {v}")
        if self.max_timestep is not None and self.max_timestep < 2:
            raise ValueError(f"max_timestep: must be >= 2, got {self.max_timestep}")
        if self.one_step_t is not None and self.one_step_t < 0:
            raise ValueError(f"one_step_t: must be >= 0, got {self.one_step_t}")
        if self.one_step_t is not None and self.max_timestep is not None and self.one_step_t >= self.max_timestep:
            raise ValueError(f"one_step_t: {self.one_step_t} must be < max_timestep {self.max_timestep}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")


@dataclass
class PipelineResult:
    """What a pipeline run produced: metrics, the comparison table and every path."""

    metrics: dict[str, Any]
    table: str                       # markdown: the comparison of initialisations (mean over held-out tasks)
    report: str                      # <eval>/report.md (full report, also per task)
    plots: list[str]
    zoo: str
    generator: str                   # the generator export
    evaluation: str
    summary: str                     # <output>/summary.md
    seconds: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [self.table, "", f"report: {self.report}"]
        lines += [f"plot:   {p}" for p in self.plots]
        lines += [f"zoo: {self.zoo}", f"generator: {self.generator}", f"summary: {self.summary}"]
        if self.seconds:
            lines.append("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in self.seconds.items()))
        return "\n".join(lines)


# ----------------------------------------------------------------------------- config helpers
def resolve_path(path: str) -> str:
    """A config path as given if it exists or is a URI; else relative to Tune's original working
    directory (trials run in their own folder) or the repository root."""
    if "://" in path or os.path.isabs(path) or os.path.exists(path):
        return path
    for base in (os.environ.get("TUNE_ORIG_WORKING_DIR"), str(REPO_ROOT)):
        if base and os.path.exists(os.path.join(base, path)):
            return os.path.join(base, path)
    return path


def _abs_output(uri: str) -> str:
    if "://" in uri or os.path.isabs(uri):
        return uri
    return os.path.join(os.environ.get("TUNE_ORIG_WORKING_DIR") or os.getcwd(), uri)


def load_pipeline_config(path: str | None = None, overrides: Sequence[str] = ()) -> PipelineConfig:
    """PipelineConfig from a YAML file (or the defaults) plus dotted ``key=value`` overrides."""
    return load_config(PipelineConfig, resolve_path(path) if path else None, overrides)


def _hash(obj: Any, n: int = 8) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def zoo_spec_of(cfg: PipelineConfig):
    """The ZooSpec of the pipeline (``zoo_set`` applied, output not yet set)."""
    from .zoo.spec import ZooSpec

    try:
        return load_config(ZooSpec, resolve_path(cfg.zoo_spec), list(cfg.zoo_set))
    except ConfigError as exc:
        raise ConfigError(f"zoo_spec/zoo_set: {exc}") from exc


def train_config_of(cfg: PipelineConfig, zoo_uri: str = "unset", storage: str = "runs", run_name: str = "generator"):
    """The GeneratorTrainConfig of the pipeline: ``train_set`` then the trial knobs applied."""
    from .config import apply_overrides
    from .train.config import GeneratorTrainConfig

    path = resolve_path(cfg.generator)
    over = list(cfg.train_set)
    try:
        data = apply_overrides(read_yaml(path), over)
    except ConfigError as exc:
        raise ConfigError(f"generator/train_set: {exc}") from exc
    method = data.get("method")
    if cfg.input_noise is not None or cfg.latent_noise is not None:
        if method != "pdiff":
            key = "input_noise" if cfg.input_noise is not None else "latent_noise"
            raise ConfigError(f"{key}: noise augmentation belongs to p-diff's autoencoder; generator "
                              f"{cfg.generator} trains method {method!r}")
        if cfg.input_noise is not None:
            over.append(f"model.autoencoder.input_noise={override_value(cfg.input_noise)}")
        if cfg.latent_noise is not None:
            over.append(f"model.autoencoder.latent_noise={override_value(cfg.latent_noise)}")
    if cfg.max_timestep is not None:
        over.append(f"scheduler.num_train_timesteps={override_value(cfg.max_timestep)}")
    if cfg.lr is not None:
        over.append(f"lr={override_value(cfg.lr)}")
        for stage, sc in (data.get("stages") or {}).items():
            if isinstance(sc, Mapping) and sc.get("lr") is not None:
                over.append(f"stages.{stage}.lr={override_value(cfg.lr)}")
    over += [f"zoo={override_value(zoo_uri)}", f"storage={override_value(storage)}", f"run_name={override_value(run_name)}"]
    try:
        return load_config(GeneratorTrainConfig, path, over)
    except ConfigError as exc:
        raise ConfigError(f"generator/train_set: {exc}") from exc


def eval_config_of(cfg: PipelineConfig, zoo_uri: str = "", generator_uri: str = "", output: str = ""):
    from .evaluation.cli import EvaluateConfig

    over = list(cfg.eval_set) + [f"num_samples={cfg.num_samples}", f"epochs={cfg.epochs}"]
    if cfg.one_step_t is not None:
        over += ["method=one_step", f"t={cfg.one_step_t}"]
    over += [f"zoo={override_value(zoo_uri)}", f"generator={override_value(generator_uri)}", f"output={override_value(output)}"]
    try:
        return load_config(EvaluateConfig, None, over)
    except ConfigError as exc:
        raise ConfigError(f"eval_set: {exc}") from exc


def check_stages(cfg: PipelineConfig):
    """Every stage config of ``cfg`` resolved and validated (ConfigError naming the field), no work done."""
    return _check(cfg)


def _check(cfg: PipelineConfig):
    """Resolve and validate every stage config before any work (raises ConfigError naming the field)."""
    spec = zoo_spec_of(cfg)
    bs = cfg.block_size if cfg.block_size is not None else spec.block_size
    rule = cfg.rule if cfg.rule is not None else spec.rule
    from .blocks import GROUPING_RULES

    if rule not in GROUPING_RULES:
        raise ConfigError(f"rule: unknown grouping rule {rule!r} (registered: {sorted(map(str, GROUPING_RULES))})")
    tcfg = train_config_of(cfg)
    ecfg = eval_config_of(cfg)
    T = tcfg.scheduler.num_train_timesteps
    if ecfg.method == "one_step" and not 0 <= ecfg.t < T:
        key = "one_step_t" if cfg.one_step_t is not None else "eval_set (t)"
        raise ConfigError(f"{key}: one-step t={ecfg.t} is outside [0, max_timestep={T})")
    return spec, bs, rule, tcfg, ecfg


# ----------------------------------------------------------------------------- re-tokenising
_ZOO_CORE = ("blocks/", "members/", "_manifest/", "failures/", "compacted/")
_RETOKENIZED = "_retokenized.json"


def retokenize_zoo(src: str, dst: str, block_size: int | None = None, rule: int | str | None = None,
                   show_progress: bool = False) -> str:
    """Write the members of zoo ``src`` into a new zoo ``dst`` with another block size and/or grouping
    rule (same members, same checkpoints, same metrics: nothing is retrained).  Caches of the zoo
    (base models, features) are copied; ``zoo_spec.json`` is rewritten with the new layout values.
    Idempotent: a finished ``dst`` is returned as is, an unfinished one is completed."""
    from tqdm.auto import tqdm

    from .storage import exists, list_files, read_bytes, resolve, write_bytes_atomic
    from .table import CheckpointRecord, ZooWriter, open_zoo
    from .zoo.builder import zoo_layout
    from .zoo.spec import ZooSpec

    droot, sroot = resolve(dst), resolve(src)
    if exists(droot.join(_RETOKENIZED)):
        return dst
    source = open_zoo(src)
    try:
        meta = json.loads(read_bytes(sroot.join("zoo_spec.json")))
        spec = from_dict(ZooSpec, meta["spec"])
    except FileNotFoundError:
        raise ConfigError(f"zoo: {sroot.join('zoo_spec.json').describe()} is missing (re-tokenising needs the spec)")
    spec = dataclasses.replace(spec, output=dst, block_size=int(block_size or spec.block_size),
                               rule=spec.rule if rule is None else rule)
    layout = zoo_layout(spec)
    writer = ZooWriter.create(dst, layout)
    done = writer.done_members()
    rows = [r for r in source.members.to_pylist() if r["member_id"] not in done]
    for r in tqdm(rows, desc=f"re-tokenise (block {spec.block_size}, rule {spec.rule})", unit="member",
                  disable=not show_progress or not rows):
        sds = source.state_dicts(r["member_id"])
        metrics = json.loads(r["metrics"]) if r.get("metrics") else [{}] * len(sds)
        hparams = json.loads(r["hparams"]) if r.get("hparams") else {}
        writer.write_member(r["member_id"], r["task_id"], r["condition"], int(r["seed"]),
                            [CheckpointRecord(step=s, state_dict=sd, metrics=m) for (s, sd), m in zip(sds, metrics)],
                            hparams=hparams)
    # caches of the family (base models, features): everything that is not the table itself
    base = sroot.path.rstrip("/") + "/"
    for info in list_files(sroot):
        rel = info.path[len(base):] if info.path.startswith(base) else info.base_name
        if rel.startswith(_ZOO_CORE) or rel in ("layout.json", "zoo_spec.json") or rel.startswith(".rayweights-probe"):
            continue
        target = droot.join(*rel.split("/"))
        if not exists(target):
            write_bytes_atomic(target, read_bytes(sroot.join(*rel.split("/"))))
    write_bytes_atomic(droot.join("zoo_spec.json"), json.dumps(
        {**meta, "spec": to_dict(spec), "retokenized_from": src}, indent=1).encode())
    writer.consolidate()
    write_bytes_atomic(droot.join(_RETOKENIZED), json.dumps(
        {"source": src, "block_size": spec.block_size, "rule": spec.rule, "members": len(source)}).encode())
    return dst


@contextlib.contextmanager
def _lock(folder: str, name: str):
    """An exclusive file lock (local folders) so concurrent trials build a shared stage once."""
    if "://" in folder:
        yield
        return
    import fcntl

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f".lock-{name}"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------- the stages
class _Stages:
    """The resolved stages of one pipeline config: folders, configs, and how to run each."""

    def __init__(self, cfg: PipelineConfig, address: str | None, show_progress: bool):
        from .storage import resolve

        self.cfg, self.address, self.show = cfg, address, show_progress
        self.output = _abs_output(cfg.output)
        self.cache = _abs_output(cfg.cache) if cfg.cache else self.output
        spec, self.block_size, self.rule, tcfg, _ = _check(cfg)
        spec_key = to_dict(dataclasses.replace(spec, output=""))
        spec_key.pop("resources", None)           # how members were scheduled does not change them
        zkey = _hash(spec_key)
        self.source_zoo = resolve(self.cache).join(f"zoo-{zkey}").uri
        self.spec = dataclasses.replace(spec, output=self.source_zoo)
        self.retokenize = (self.block_size, self.rule) != (spec.block_size, spec.rule)
        self.zoo = (resolve(self.cache).join(f"zoo-{zkey}-b{self.block_size}-r{self.rule}").uri
                    if self.retokenize else self.source_zoo)
        # a generator trained in rounds (run_trial, ASHA) is the trial's own: other trials never see it half-trained
        gkey = _hash({"zoo": self.zoo, "train": self._train_key(tcfg),
                      "owner": self.output if cfg.rounds > 1 else None})
        self.run_name = f"gen-{gkey}"
        self.tcfg = train_config_of(cfg, self.zoo, self.cache, self.run_name)
        self.run_uri = resolve(self.cache).join(self.run_name).uri
        self.export = resolve(self.run_uri).join("export").uri
        ecfg = eval_config_of(cfg, self.zoo, self.export, "")
        self.eval_dir = resolve(self.cache).join(f"eval-{_hash({'gen': self.run_uri, 'eval': to_dict(ecfg)})}").uri
        self.ecfg = dataclasses.replace(ecfg, output=self.eval_dir)

    @staticmethod
    def _train_key(tcfg) -> dict:
        d = to_dict(tcfg)
        for k in ("zoo", "storage", "run_name", "log_every", "checkpoint_every", "max_failures", "fault_injection"):
            d.pop(k, None)
        return d

    # -- zoo
    def build_zoo(self) -> dict:
        from .storage import exists, resolve
        from .zoo.builder import build_zoo, prepare

        info: dict = {"zoo": self.zoo}
        cache_dir = self.cache if "://" not in self.cache else ""
        with _lock(cache_dir, os.path.basename(self.source_zoo)) if cache_dir else contextlib.nullcontext():
            try:
                prepare(self.spec)
            except (ValueError, KeyError) as exc:
                raise ConfigError(f"zoo_spec: {exc.args[0] if exc.args else exc}") from exc
            summary = build_zoo(self.spec, address=self.address, progress=self.show)
            info["build"] = str(summary)
            if summary.failed:
                raise JobFailed(f"zoo: {summary.failed} member(s) failed to build ({summary.failures[0][1]}); "
                                   f"see {self.source_zoo}/failures/")
        if self.retokenize:
            with _lock(cache_dir, os.path.basename(self.zoo)) if cache_dir else contextlib.nullcontext():
                if not exists(resolve(self.zoo).join(_RETOKENIZED)):
                    retokenize_zoo(self.source_zoo, self.zoo, self.block_size, self.rule, self.show)
            info["retokenized"] = f"block_size {self.block_size}, rule {self.rule}"
        return info

    # -- generator
    def last_stage(self) -> tuple[str, str]:
        from .generators.methods import METHODS

        m = METHODS[self.tcfg.method]
        return m.stages[-1], m.stage_model[m.stages[-1]]

    def train(self, steps_of_last: int | None = None):
        from .train.config import StageConfig
        from .train.trainer import TrainError, preflight, train_generator

        tcfg = self.tcfg
        if steps_of_last is not None:
            stage, _ = self.last_stage()
            stages = dict(tcfg.stages)
            stages[stage] = dataclasses.replace(stages.get(stage) or StageConfig(), steps=int(steps_of_last))
            every = min(tcfg.checkpoint_every, int(steps_of_last))
            tcfg = dataclasses.replace(tcfg, stages=stages, checkpoint_every=every)
        try:
            plan = preflight(tcfg)
            return train_generator(tcfg, address=self.address, show_progress=self.show, plan=plan)
        except TrainError as exc:          # bad input (exit 2) or a failed stage (TrainFailed, exit 1)
            raise type(exc)(f"generator: {exc}") from exc

    def last_stage_steps(self) -> int | None:
        """Steps of the finished last stage (its done.json), None if it is not finished."""
        from .storage import read_bytes, resolve

        _, key = self.last_stage()
        try:
            return int(json.loads(read_bytes(resolve(self.run_uri).join("stages", key, "done.json")))["steps"])
        except (FileNotFoundError, KeyError, ValueError):
            return None

    def discard_generator(self) -> None:
        """Remove the generator run (a trial's own, half-trained in rounds) so that it starts over."""
        from .storage import resolve

        loc = resolve(self.run_uri)
        try:
            loc.fs.delete_dir(loc.path)
        except (FileNotFoundError, OSError):
            pass

    def reopen_last_stage(self) -> None:
        """Let the next ``train`` continue the (finished) last stage from its latest checkpoint."""
        from .storage import delete, resolve

        _, key = self.last_stage()
        delete(resolve(self.run_uri).join("stages", key, "done.json"))

    # -- evaluation
    def evaluate(self) -> dict:
        from .evaluation.cli import evaluate
        from .storage import exists, read_bytes, resolve

        done = resolve(self.eval_dir).join("results.json")
        if not exists(done):
            evaluate(self.ecfg, address=self.address, show_progress=self.show, print_table=False)
        return json.loads(read_bytes(done))


# ----------------------------------------------------------------------------- metrics and table
def _mean(values) -> float:
    v = [float(x) for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(v) / len(v) if v else math.nan


def eval_metrics(results: Mapping[str, Any]) -> dict[str, Any]:
    """Sweep metrics from an evaluation's ``results.json``: ``gen_<metric>`` = mean over tasks of
    the average epoch-0 metric of the N generated samples (no fine-tuning), plus best/median,
    the random-init and generated-after-fine-tuning values and seconds per sample."""
    tasks = results.get("tasks") or []
    if not tasks:
        return {}
    metric = tasks[0]["metric"]
    gen = [t["samples"]["generated"] for t in tasks]
    out: dict[str, Any] = {
        "metric": metric,
        f"gen_{metric}": _mean(g.get("avg") for g in gen),
        f"gen_{metric}_best": _mean(g.get("best") for g in gen),
        f"gen_{metric}_median": _mean(g.get("median") for g in gen),
        "num_tasks": len(tasks),
    }
    for init in ("random", "generated", "nearest_noise", "soup", "pretrained", "best_of_n"):
        rows = [t["table"][init] for t in tasks if init in t["table"]]
        if rows:
            out[f"{init}_{metric}_epoch0"] = _mean(r.get("epoch0") for r in rows)
            out[f"{init}_{metric}_final"] = _mean(r.get("final") for r in rows)
    secs = [t["table"]["generated"].get("init_seconds") for t in tasks if "generated" in t["table"]]
    if secs:
        out["sample_seconds"] = _mean(secs)
    return out


def _comparison_table(results: Mapping[str, Any]) -> str:
    from .evaluation.core import INIT_LABELS

    tasks = results.get("tasks") or []
    if not tasks:
        return "(no evaluated tasks)"
    metric, E = tasks[0]["metric"], tasks[0]["epochs"]
    fmt = lambda v: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"
    fsp = lambda v: "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"
    lines = [f"Mean over {len(tasks)} held-out task(s) ({', '.join(t['condition'] for t in tasks)}): "
             f"{metric} before fine-tuning (epoch 0) and after {E} epoch(s)",
             "", f"| initialisation | {metric} epoch 0 | {metric} epoch {E} | speed-up to random's final (epochs) |",
             "|---|---:|---:|---:|"]
    for init, label in INIT_LABELS.items():
        rows = [t["table"][init] for t in tasks if init in t["table"]]
        if not rows:
            continue
        sp = [r.get("speedup_epochs") for r in rows]
        sp = [s for s in sp if s is not None]
        lines.append(f"| {label} | {fmt(_mean(r.get('epoch0') for r in rows))} | "
                     f"{fmt(_mean(r.get('final') for r in rows))} | {fsp(_mean(sp) if sp else None)} |")
    gen = [t["samples"]["generated"] for t in tasks]
    lines += ["", f"Generated samples without fine-tuning (N = {gen[0].get('n')} per task): "
                  f"best {fmt(_mean(g.get('best') for g in gen))}, avg {fmt(_mean(g.get('avg') for g in gen))}, "
                  f"median {fmt(_mean(g.get('median') for g in gen))}"]
    for v in results.get("verdict") or []:
        lines.append(f"- {v}")
    return "\n".join(lines)


def _plots(eval_dir: str) -> list[str]:
    from .storage import list_files, resolve

    loc = resolve(eval_dir)
    return sorted(resolve(eval_dir).join(i.base_name).uri for i in list_files(loc, ".png")
                  if os.path.dirname(i.path.rstrip("/")) == loc.path.rstrip("/"))


def _train_metrics(train_result) -> dict[str, Any]:
    stages = list(train_result.stages.items())
    out: dict[str, Any] = {}
    if stages:
        out["gen_loss"] = float(stages[-1][1].get("loss", math.nan))
        if len(stages) > 1:
            out["ae_loss"] = float(stages[0][1].get("loss", math.nan))
        out["train_steps"] = int(stages[-1][1].get("steps", 0))
    return out


def _layout_metrics(zoo_uri: str) -> dict[str, Any]:
    from .table import open_zoo

    L = open_zoo(zoo_uri).layout
    return {"num_blocks": L.num_blocks, "block_size": L.block_size, "num_params": L.num_params}


# ----------------------------------------------------------------------------- entry points
def _banner(show: bool, text: str) -> None:
    if show:
        print(f"\n=== {text}", flush=True)


def run_pipeline(cfg: PipelineConfig, show_progress: bool = True, address: str | None = None,
                 print_table: bool = True) -> PipelineResult:
    """Build the zoo, train the generator, evaluate it on the held-out tasks, print the table."""
    from .runtime import ray_init
    from .storage import resolve, write_bytes_atomic

    st = _Stages(cfg, address, show_progress)          # every config checked before any work
    ray_init(address)
    secs: dict[str, float] = {}
    t0 = time.perf_counter()
    _banner(show_progress, f"[1/3] zoo: {cfg.zoo_spec} -> {st.zoo}")
    zinfo = st.build_zoo()
    if show_progress and "build" in zinfo:
        print(zinfo["build"], flush=True)
    secs["zoo"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    _banner(show_progress, f"[2/3] generator: {cfg.generator} ({st.tcfg.method}) -> {st.run_uri}")
    tres = st.train()
    if show_progress:
        print(tres.summary(), flush=True)
    secs["generator"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    _banner(show_progress, f"[3/3] evaluation: {cfg.num_samples} samples per held-out task, {cfg.epochs} epoch(s) "
                           f"-> {st.eval_dir}")
    results = st.evaluate()
    secs["evaluation"] = time.perf_counter() - t0
    metrics = {**eval_metrics(results), **_train_metrics(tres), **_layout_metrics(st.zoo)}
    table = _comparison_table(results)
    report = resolve(st.eval_dir).join("report.md").uri
    plots = _plots(st.eval_dir)
    out = resolve(st.output)
    summary_md = out.join("summary.md")
    header = (f"# Pipeline run\n\nzoo `{st.zoo}` ({cfg.zoo_spec}), generator `{st.export}` ({cfg.generator}, "
              f"{st.tcfg.method}), evaluation `{st.eval_dir}`\n\n")
    write_bytes_atomic(summary_md, (header + table + f"\n\nFull report: {report}\n").encode())
    write_bytes_atomic(out.join("summary.json"), json.dumps(
        {"config": to_dict(cfg), "metrics": metrics, "zoo": st.zoo, "generator": st.export, "evaluation": st.eval_dir,
         "report": report, "plots": plots, "seconds": secs}, indent=1, default=str).encode())
    result = PipelineResult(metrics, table, report, plots, st.zoo, st.export, st.eval_dir, summary_md.uri, secs)
    if print_table:
        print("\n" + str(result), flush=True)
    return result


def _score_round(st: "_Stages") -> dict[str, Any]:
    """Metric of the generated weights without fine-tuning on the held-out tasks (intermediate rounds)."""
    from .evaluation import make_adapter, score_samples
    from .evaluation.cli import resolve_defaults
    from .sampling import load_sampler
    from .table import open_zoo

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


def _trial_rounds(cfg: PipelineConfig, show_progress: bool):
    """The trial's work; yields the metrics of each round (the last one after the full evaluation)."""
    from .runtime import ray_init

    ray_init(None)
    st = _Stages(cfg, None, show_progress)
    t0 = time.perf_counter()
    st.build_zoo()
    layout = _layout_metrics(st.zoo)
    if cfg.rounds > 1:
        from .train.config import resolved_stage

        stage, _ = st.last_stage()
        total = int(resolved_stage(st.tcfg, stage)["steps"])
        if st.last_stage_steps() == total:           # a restarted trial whose training had finished
            rounds = range(0)
        else:                                        # else start the trial's rounds over
            st.discard_generator()
            rounds = range(1, cfg.rounds)
        for r in rounds:
            tres = st.train(steps_of_last=max(1, math.ceil(total * r / cfg.rounds)))
            yield {**_score_round(st), **_train_metrics(tres), **layout, "round": r,
                   "seconds": time.perf_counter() - t0}
            st.reopen_last_stage()
        tres = st.train(steps_of_last=total)
    else:
        tres = st.train()
    results = st.evaluate()
    yield {**eval_metrics(results), **_train_metrics(tres), **layout, "round": cfg.rounds,
           "seconds": time.perf_counter() - t0, "report": resolve_uri(st.eval_dir, "report.md")}


def run_trial(base_config: str, overrides: Sequence[str], trial_dir: str,
              report: Callable[[dict], Any] | None = None, show_progress: bool = False) -> dict:
    """One Tune trial: the pipeline of ``base_config`` + ``overrides`` with its output in ``trial_dir``.

    Stage folders are shared between the trials of a sweep (``<trial_dir>/../_shared`` unless the
    config sets ``cache``), keyed by each stage's effective config: trials that differ only in
    ``one_step_t`` share one generator, trials that differ only in block size share the zoo's
    members.  ``report(metrics)`` is called after each of the ``rounds`` training rounds (for ASHA;
    intermediate rounds score the generated weights only) and after the final evaluation; the
    final metrics are returned (and written to ``<trial_dir>/metrics.json``).

    Inside a Tune trial (a placement group of the trial's resources) the stages run in a 0-CPU Ray
    task scheduled outside that group, so their own tasks, actors and Ray Train workers take the
    cluster's free resources instead of having to fit in the trial's bundle."""
    import ray

    from .runtime import ray_init

    trial_dir = _abs_output(trial_dir)
    cfg = load_pipeline_config(base_config, list(overrides) + [f"output={override_value(trial_dir)}"])
    if not cfg.cache:
        cfg = dataclasses.replace(cfg, cache=os.path.join(os.path.dirname(trial_dir.rstrip("/")), "_shared"))
    _check(cfg)
    report = report or (lambda m: None)
    ray_init(None)
    metrics: dict = {}
    if ray.util.get_current_placement_group() is not None:
        task = ray.remote(num_cpus=0, scheduling_strategy="DEFAULT", max_retries=0)(_trial_rounds)
        for ref in task.remote(cfg, show_progress):
            metrics = ray.get(ref)
            report(metrics)
    else:
        for metrics in _trial_rounds(cfg, show_progress):
            report(metrics)
    from .storage import resolve, write_bytes_atomic

    write_bytes_atomic(resolve(trial_dir).join("metrics.json"), json.dumps(metrics, indent=1, default=str).encode())
    return metrics


def resolve_uri(base: str, *parts: str) -> str:
    from .storage import resolve

    return resolve(base).join(*parts).uri


@job_main
def main(argv: Sequence[str] | None = None) -> int:
    """``run-all``: ``python jobs/run_all.py [--config PIPELINE.yaml] [--set k=v ...] [--output DIR]``."""
    from .config import job_argparser, job_overrides

    p = job_argparser("The whole pipeline: build a zoo, train a generator, evaluate it on held-out tasks "
                      f"(default: {DEFAULT_CONFIG_NOTE})", config_required=False)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()        # no per-model-load advice on the console
    for noisy in ("ray.data", "ray.train", "ray.tune", "DeepSpeed", "deepspeed", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    with expected(ValueError, KeyError):
        cfg = load_pipeline_config(a.config, job_overrides(a))
        _Stages(cfg, a.address, False)             # all three stage configs are checked here
    run_pipeline(cfg, show_progress=not a.no_progress, address=a.address)
    return 0
