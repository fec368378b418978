"""FINE learngenes: ``python jobs/learngene.py --config jobs/configs/learngene_resnet.yaml [--set k=v] [--output URI]``.

Runs on an embedded local Ray, or on the cluster it was submitted to with ``ray job submit``.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rayweights.learngene.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
