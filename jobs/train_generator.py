"""Train a weight generator: ``python jobs/train_generator.py --config jobs/configs/pdiff_tiny.yaml
[--set k=v] [--output STORAGE_URI]``.

Runs on an embedded local Ray, or on the cluster it was submitted to with ``ray job submit``.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rayweights.train.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
