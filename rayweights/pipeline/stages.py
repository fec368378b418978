"""The resolved stages of one pipeline config: their folders (named after each stage's effective
config), their configs, and how to run each one (reusing what a run before finished)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from ..config import ConfigError, to_dict
from ..errors import JobFailed
from ..evaluation.cli import evaluate
from ..generators import METHODS
from ..storage import exists, list_files, read_bytes, resolve
from ..table import open_zoo
from ..train.config import StageConfig
from ..train.trainer import TrainError, TrainResult, preflight, train_generator
from ..zoo import build_zoo, retokenize_zoo
from ..zoo.builder import prepare
from .cache import stage_hash, stage_lock
from .config import PipelineConfig, abs_output, check_stages, eval_config_of, train_config_of

__all__ = ["Stages", "train_metrics", "layout_metrics"]

# train settings that do not change the trained generator (not part of its folder's hash)
_NOT_IN_TRAIN_KEY = ("zoo", "storage", "run_name", "log_every", "checkpoint_every", "max_failures", "fault_injection")


class Stages:
    """Folders, configs and runners of the zoo, generator and evaluation stages of ``cfg``; every
    stage config is checked here, before any work."""

    def __init__(self, cfg: PipelineConfig, address: str | None, show_progress: bool):
        self.cfg, self.address, self.show = cfg, address, show_progress
        self.output = abs_output(cfg.output)
        self.cache = abs_output(cfg.cache) if cfg.cache else self.output
        checked = check_stages(cfg)
        spec, self.block_size, self.rule = checked.spec, checked.block_size, checked.rule
        spec_key = to_dict(dataclasses.replace(spec, output=""))
        spec_key.pop("resources", None)           # how members were scheduled does not change them
        zkey = stage_hash(spec_key)
        cache = resolve(self.cache)
        self.source_zoo = cache.join(f"zoo-{zkey}").uri
        self.spec = dataclasses.replace(spec, output=self.source_zoo)
        self.retokenize = (self.block_size, self.rule) != (spec.block_size, spec.rule)
        self.zoo = (cache.join(f"zoo-{zkey}-b{self.block_size}-r{self.rule}").uri
                    if self.retokenize else self.source_zoo)
        train_key = {k: v for k, v in to_dict(checked.train).items() if k not in _NOT_IN_TRAIN_KEY}
        # a generator trained in rounds (sweep trials, ASHA) is the trial's own: other trials never see it half-trained
        gkey = stage_hash({"zoo": self.zoo, "train": train_key, "owner": self.output if cfg.rounds > 1 else None})
        self.run_name = f"gen-{gkey}"
        self.tcfg = train_config_of(cfg, self.zoo, self.cache, self.run_name)
        self.run_uri = cache.join(self.run_name).uri
        self.export = resolve(self.run_uri).join("export").uri
        ecfg = eval_config_of(cfg, self.zoo, self.export, "")
        self.eval_dir = cache.join(f"eval-{stage_hash({'gen': self.run_uri, 'eval': to_dict(ecfg)})}").uri
        self.ecfg = dataclasses.replace(ecfg, output=self.eval_dir)

    @property
    def _lock_dir(self) -> str:
        return self.cache if "://" not in self.cache else ""

    # -- zoo
    def build_zoo(self) -> dict:
        """Build (or finish) the zoo, then re-tokenise it when the trial's layout differs."""
        info: dict = {"zoo": self.zoo}
        with stage_lock(self._lock_dir, os.path.basename(self.source_zoo)):
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
            with stage_lock(self._lock_dir, os.path.basename(self.zoo)):
                retokenize_zoo(self.source_zoo, self.zoo, self.block_size, self.rule, self.show)
            info["retokenized"] = f"block_size {self.block_size}, rule {self.rule}"
        return info

    # -- generator
    def last_stage(self) -> str:
        """The name of the generator method's last training stage."""
        return METHODS[self.tcfg.method].stages[-1]

    def train(self, steps_of_last: int | None = None, extend: bool = False) -> TrainResult:
        """Train the generator (finished stages are reused).  ``steps_of_last``: train the last stage
        to that many steps instead; ``extend``: continue a last stage finished with fewer steps from
        its latest checkpoint (training in rounds)."""
        tcfg = self.tcfg
        if steps_of_last is not None:
            stage = self.last_stage()
            stages = dict(tcfg.stages)
            stages[stage] = dataclasses.replace(stages.get(stage) or StageConfig(), steps=int(steps_of_last))
            tcfg = dataclasses.replace(tcfg, stages=stages, checkpoint_every=min(tcfg.checkpoint_every,
                                                                                 int(steps_of_last)))
        try:
            plan = preflight(tcfg)
            return train_generator(tcfg, address=self.address, show_progress=self.show, plan=plan,
                                   extend_last_stage=extend)
        except TrainError as exc:          # bad input (exit 2) or a failed stage (TrainFailed, exit 1)
            raise type(exc)(f"generator: {exc}") from exc

    def discard_generator(self) -> None:
        """Remove the generator run (a trial's own, half-trained in rounds) so that it starts over."""
        loc = resolve(self.run_uri)
        try:
            loc.fs.delete_dir(loc.path)
        except (FileNotFoundError, OSError):
            pass

    # -- evaluation
    def evaluate(self) -> dict:
        """The evaluation's ``results.json`` (evaluated now unless a run before finished it)."""
        done = resolve(self.eval_dir).join("results.json")
        if not exists(done):
            evaluate(self.ecfg, address=self.address, show_progress=self.show, print_table=False)
        return json.loads(read_bytes(done))

    def plots(self) -> list[str]:
        """The PNG plots of the evaluation report (its top folder)."""
        loc = resolve(self.eval_dir)
        return sorted(loc.join(i.base_name).uri for i in list_files(loc, ".png")
                      if os.path.dirname(i.path.rstrip("/")) == loc.path.rstrip("/"))


def train_metrics(train_result: TrainResult) -> dict[str, Any]:
    """Final loss of the last stage (and of the first, for two-stage methods) and its steps."""
    stages = list(train_result.stages.items())
    out: dict[str, Any] = {}
    if stages:
        out["gen_loss"] = float(stages[-1][1].get("loss", math.nan))
        if len(stages) > 1:
            out["ae_loss"] = float(stages[0][1].get("loss", math.nan))
        out["train_steps"] = int(stages[-1][1].get("steps", 0))
    return out


def layout_metrics(zoo_uri: str) -> dict[str, Any]:
    L = open_zoo(zoo_uri).layout
    return {"num_blocks": L.num_blocks, "block_size": L.block_size, "num_params": L.num_params}
