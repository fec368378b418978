"""``train-generator``: ``python jobs/train_generator.py --config jobs/configs/pdiff_tiny.yaml
[--set key=value ...] [--output STORAGE_URI] [--address RAY_ADDRESS]``.

Everything that can be wrong (config fields, zoo, conditions, layout vs generator, batch size,
storage) is checked before any training; an error prints one line naming it and returns 2.
``--output`` sets ``storage`` (runs are ``<storage>/<run_name>``).
"""

from __future__ import annotations

import logging

from ..config import job_argparser, job_overrides, load_config
from ..errors import expected, job_main
from .config import GeneratorTrainConfig
from .trainer import preflight, train_generator


@job_main
def main(argv=None) -> int:
    p = job_argparser("Train a weight generator on zoo tables (Ray Train V2 + DeepSpeed)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("DeepSpeed", "deepspeed", "ray", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    with expected(ValueError):
        cfg = load_config(GeneratorTrainConfig, a.config, job_overrides(a, "storage"))
        plan = preflight(cfg)
    result = train_generator(cfg, address=a.address, show_progress=not a.no_progress, plan=plan)
    print(result.summary())
    return 0
