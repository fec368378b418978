"""The whole pipeline in one command: ``python jobs/run_all.py [--config PIPELINE.yaml] [--set k=v ...]
[--output DIR]``.

Default (no --config): the embedded tiny pipeline (``rayweights.pipeline.PipelineConfig()``) on a
local Ray, a local folder (``runs/pipeline``) and bundled data: build a small zoo, train a
generator, sample weights for the held-out tasks, fine-tune them against the baselines, print the
comparison table and the paths of the report and plots.  Re-running reuses finished stages.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rayweights.pipeline import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
