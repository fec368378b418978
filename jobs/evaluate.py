"""Fine-tune generated vs baseline initialisations on held-out tasks; write report.md + PNG curves.

    python jobs/evaluate.py --config cfg.yaml --output runs/x/eval [--set epochs=5 ...]
    ray job submit --working-dir . -- python jobs/evaluate.py --config cfg.yaml --output s3://...

See rayweights.evaluation.cli.EvaluateConfig for the fields.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rayweights.evaluation.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
