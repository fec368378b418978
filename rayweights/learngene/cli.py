"""``learngene``: FINE learngene initialisation of variable-sized models (``jobs/learngene.py``).

    python jobs/learngene.py --config jobs/configs/learngene_resnet.yaml [--set k=v] [--output URI]
    ray job submit --working-dir . -- python jobs/learngene.py --config ... --output s3://...

Everything that can be wrong (unknown keys, families, layer types that match nothing, sizes that
do not run on the task, an unwritable output) is reported before any training: one line naming the
field or file on stderr, exit status 2.
"""

from __future__ import annotations

from typing import Sequence

from ..config import ConfigError, job_argparser, job_overrides, load_config
from ..errors import job_main
from ..storage import check_writable
from .experiment import plan_learngene, run_learngene
from .report import format_table
from .spec import LearngeneConfig


@job_main
def main(argv: Sequence[str] | None = None) -> int:
    p = job_argparser("FINE learngene initialisation of variable-sized models: extract U, V from a trained "
                      "model, initialise other sizes, Σ-only phase, compare with random init and direct pretraining")
    p.add_argument("--no-ray", action="store_true", help="run every size in this process (debugging)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    cfg = load_config(LearngeneConfig, a.config, job_overrides(a))
    if a.no_ray:
        cfg.parallel = False
    if not cfg.output:
        raise ConfigError("output: give --output or output: in the config")
    plan = plan_learngene(cfg)
    check_writable(cfg.output)
    summary = run_learngene(plan, cfg.output, address=a.address, progress=not a.quiet)
    print(format_table(summary))
    t, st = summary["totals"], summary["storage"]
    print(f"total steps: direct {t['direct_steps']}, FINE {t['fine_steps']}; "
          f"storage: models {st['models_bytes']} B vs learngenes {st['learngene_bytes']} B ({st['ratio']:.2f}x)")
    print(f"report: {summary['files']['report.md']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
