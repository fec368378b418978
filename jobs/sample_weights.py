"""Sample weights for conditions from a trained generator; write safetensors state_dicts.

    python jobs/sample_weights.py --config cfg.yaml --output runs/x/samples [--set method=ddim ...]
    ray job submit --working-dir . -- python jobs/sample_weights.py --config cfg.yaml --output s3://...

See rayweights.sampling.SampleConfig for the fields.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rayweights.sampling import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
