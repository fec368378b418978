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

Modules: :mod:`.config` (the config and the stage configs it makes, trial knobs), :mod:`.stages`
(stage folders and runners), :mod:`.cache` (stage hashes, file locks).  Sweep trials
(``rayweights.sweep.run_trial``) run the same stages.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from diffusers.utils import logging as diffusers_logging

from ..config import job_argparser, job_overrides, to_dict
from ..errors import expected, job_main
from ..evaluation.report import comparison_table, summary_metrics
from .. import runtime          # runtime.ray_init at call time: tests can forbid starting Ray
from ..storage import resolve, write_bytes_atomic
from .config import (DEFAULT_CONFIG_NOTE, PipelineConfig, StageConfigs, check_stages, eval_config_of,
                     load_pipeline_config, resolve_path, train_config_of, zoo_spec_of)
from .stages import Stages, layout_metrics, train_metrics

__all__ = ["PipelineConfig", "PipelineResult", "StageConfigs", "Stages", "run_pipeline", "load_pipeline_config",
           "check_stages", "resolve_path", "zoo_spec_of", "train_config_of", "eval_config_of", "train_metrics",
           "layout_metrics", "main", "DEFAULT_CONFIG_NOTE"]

log = logging.getLogger(__name__)


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


def _banner(show: bool, text: str) -> None:
    if show:
        print(f"\n=== {text}", flush=True)


def run_pipeline(cfg: PipelineConfig, show_progress: bool = True, address: str | None = None,
                 print_table: bool = True) -> PipelineResult:
    """Build the zoo, train the generator, evaluate it on the held-out tasks, print the table."""
    st = Stages(cfg, address, show_progress)          # every config checked before any work
    runtime.ray_init(address)
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
    metrics = {**summary_metrics(results), **train_metrics(tres), **layout_metrics(st.zoo)}
    table = comparison_table(results)
    report = resolve(st.eval_dir).join("report.md").uri
    plots = st.plots()
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


@job_main
def main(argv: Sequence[str] | None = None) -> int:
    """``run-all``: ``python jobs/run_all.py [--config PIPELINE.yaml] [--set k=v ...] [--output DIR]``."""
    p = job_argparser("The whole pipeline: build a zoo, train a generator, evaluate it on held-out tasks "
                      f"(default: {DEFAULT_CONFIG_NOTE})", config_required=False)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    diffusers_logging.set_verbosity_error()        # no per-model-load advice on the console
    for noisy in ("ray.data", "ray.train", "ray.tune", "DeepSpeed", "deepspeed", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    with expected(ValueError, KeyError):
        cfg = load_pipeline_config(a.config, job_overrides(a))
        Stages(cfg, a.address, False)              # all three stage configs are checked here
    run_pipeline(cfg, show_progress=not a.no_progress, address=a.address)
    return 0
