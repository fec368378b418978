"""``build-zoo``: zoo spec -> weight-block tables (``python jobs/build_zoo.py`` / ``rayweights build-zoo``)."""

from __future__ import annotations

from ..config import job_argparser, job_overrides, load_config
from ..errors import expected, job_main
from .builder import build_zoo, prepare
from .spec import ZooSpec


@job_main
def main(argv=None) -> int:
    p = job_argparser("Build a model zoo into weight-block tables (Ray Data)")
    p.add_argument("--no-ray", action="store_true", help="train members in this process (debugging)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    with expected(ValueError, KeyError):
        spec = load_config(ZooSpec, a.config, job_overrides(a))
        prepare(spec)   # everything that can be wrong is checked before any training
    summary = build_zoo(spec, address=a.address, use_ray=not a.no_ray, progress=not a.no_progress)
    print(summary)
    for mid, err in summary.failures:
        print(f"  failed: {mid}: {err}")
    return 0 if summary.failed == 0 else 1
