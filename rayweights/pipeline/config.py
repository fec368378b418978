"""The pipeline's config and its translation into the three stage configs (zoo, generator, evaluation).

Trial knobs (``None`` = the stage config's own value), for sweeps (``tune_spaces/*.yaml``):

| key | goes to |
|---|---|
| ``block_size``, ``rule`` | the zoo layout: the built zoo is re-tokenised (``rayweights.zoo.retokenize_zoo``), members are not retrained |
| ``input_noise``, ``latent_noise`` | ``model.autoencoder.{input,latent}_noise`` of the train config (p-diff) |
| ``max_timestep`` | ``scheduler.num_train_timesteps`` of the train config |
| ``lr`` | ``lr`` of the train config and of every stage that sets its own |
| ``one_step_t`` | ``t`` of the evaluation's one-step sampling (``method: one_step``) |
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

from ..blocks import GROUPING_RULES
from ..config import ConfigError, apply_overrides, load_config, override_value, read_yaml
from ..evaluation.cli import EvaluateConfig
from ..train.config import GeneratorTrainConfig
from ..zoo.spec import ZooSpec

__all__ = ["PipelineConfig", "StageConfigs", "load_pipeline_config", "resolve_path", "abs_output", "zoo_spec_of",
           "train_config_of", "eval_config_of", "check_stages", "DEFAULT_CONFIG_NOTE"]

REPO_ROOT = Path(__file__).resolve().parents[2]
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
    rounds: int = 1                                       # sweep trials: report after each of R training rounds
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


class StageConfigs(NamedTuple):
    """Every stage config of a pipeline config, resolved and validated (:func:`check_stages`)."""

    spec: ZooSpec                  # the zoo spec as built (its own block size and rule)
    block_size: int                # the layout the generator trains on (re-tokenised when it differs)
    rule: int | str
    train: GeneratorTrainConfig
    eval: EvaluateConfig


def resolve_path(path: str) -> str:
    """A config path as given if it exists or is a URI; else relative to Tune's original working
    directory (trials run in their own folder) or the repository root."""
    if "://" in path or os.path.isabs(path) or os.path.exists(path):
        return path
    for base in (os.environ.get("TUNE_ORIG_WORKING_DIR"), str(REPO_ROOT)):
        if base and os.path.exists(os.path.join(base, path)):
            return os.path.join(base, path)
    return path


def abs_output(uri: str) -> str:
    """An output URI; a relative local folder made absolute (from Tune's original working directory)."""
    if "://" in uri or os.path.isabs(uri):
        return uri
    return os.path.join(os.environ.get("TUNE_ORIG_WORKING_DIR") or os.getcwd(), uri)


def load_pipeline_config(path: str | None = None, overrides: Sequence[str] = ()) -> PipelineConfig:
    """PipelineConfig from a YAML file (or the defaults) plus dotted ``key=value`` overrides."""
    return load_config(PipelineConfig, resolve_path(path) if path else None, overrides)


def _stage_config(cls, path: str | None, overrides: Sequence[str], section: str):
    """``load_config`` of one stage's config; an error names the pipeline section it came from."""
    try:
        return load_config(cls, path, list(overrides))
    except ConfigError as exc:
        raise ConfigError(f"{section}: {exc}") from exc


def zoo_spec_of(cfg: PipelineConfig) -> ZooSpec:
    """The ZooSpec of the pipeline (``zoo_set`` applied, output not yet set)."""
    return _stage_config(ZooSpec, resolve_path(cfg.zoo_spec), cfg.zoo_set, "zoo_spec/zoo_set")


def train_config_of(cfg: PipelineConfig, zoo_uri: str = "unset", storage: str = "runs",
                    run_name: str = "generator") -> GeneratorTrainConfig:
    """The GeneratorTrainConfig of the pipeline: ``train_set`` then the trial knobs applied."""
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
    over += [f"zoo={override_value(zoo_uri)}", f"storage={override_value(storage)}",
             f"run_name={override_value(run_name)}"]
    return _stage_config(GeneratorTrainConfig, path, over, "generator/train_set")


def eval_config_of(cfg: PipelineConfig, zoo_uri: str = "", generator_uri: str = "", output: str = "") -> EvaluateConfig:
    """The EvaluateConfig of the pipeline: ``eval_set``, N samples, E epochs, the one-step knob."""
    over = list(cfg.eval_set) + [f"num_samples={cfg.num_samples}", f"epochs={cfg.epochs}"]
    if cfg.one_step_t is not None:
        over += ["method=one_step", f"t={cfg.one_step_t}"]
    over += [f"zoo={override_value(zoo_uri)}", f"generator={override_value(generator_uri)}",
             f"output={override_value(output)}"]
    return _stage_config(EvaluateConfig, None, over, "eval_set")


def check_stages(cfg: PipelineConfig) -> StageConfigs:
    """Every stage config of ``cfg`` resolved and validated before any work (ConfigError naming the field)."""
    spec = zoo_spec_of(cfg)
    bs = cfg.block_size if cfg.block_size is not None else spec.block_size
    rule = cfg.rule if cfg.rule is not None else spec.rule
    if rule not in GROUPING_RULES:
        raise ConfigError(f"rule: unknown grouping rule {rule!r} (registered: {sorted(map(str, GROUPING_RULES))})")
    tcfg = train_config_of(cfg)
    ecfg = eval_config_of(cfg)
    T = tcfg.scheduler.num_train_timesteps
    if ecfg.method == "one_step" and not 0 <= ecfg.t < T:
        key = "one_step_t" if cfg.one_step_t is not None else "eval_set (t)"
        raise ConfigError(f"{key}: one-step t={ecfg.t} is outside [0, max_timestep={T})")
    return StageConfigs(spec, bs, rule, tcfg, ecfg)
