"""``build-zoo``: zoo spec -> weight-block tables (``python jobs/build_zoo.py`` / ``rayweights build-zoo``)."""

from __future__ import annotations

import sys

from ..config import ConfigError, job_argparser, job_overrides, load_config
from ..storage import StorageError
from .builder import build_zoo, prepare
from .editor import EditorError
from .spec import ZooSpec


def main(argv=None) -> int:
    p = job_argparser("Build a model zoo into weight-block tables (Ray Data)")
    p.add_argument("--no-ray", action="store_true", help="train members in this process (debugging)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    try:
        spec = load_config(ZooSpec, a.config, job_overrides(a))
        prepare(spec)   # everything that can be wrong is checked before any training
    except (ConfigError, ValueError, KeyError, StorageError, EditorError) as exc:
        msg = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"error: {msg}", file=sys.stderr)
        return 2
    summary = build_zoo(spec, address=a.address, use_ray=not a.no_ray, progress=not a.no_progress)
    print(summary)
    for mid, err in summary.failures:
        print(f"  failed: {mid}: {err}")
    return 0 if summary.failed == 0 else 1
