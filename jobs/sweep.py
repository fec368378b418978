"""A Ray Tune sweep over a search space file: ``python jobs/sweep.py --space tune_spaces/block_size.yaml
[--set key=value ...] [--output runs/sweeps] [--fresh]``.

Each trial runs the pipeline of the space's ``base_config`` (``jobs/configs/sweep_base.yaml``) with
the trial's values; results table (markdown + CSV) and plot go to ``<output>/<space name>_results.*``.
An interrupted sweep resumes where it stopped unless ``--fresh``.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rayweights.sweep import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
