"""``rayweights <subcommand> ...``: the same entry points as ``jobs/*.py``.

Subcommands are a small registry of ``"module:function"`` strings, imported lazily so that
``rayweights --help`` does not import torch or Ray.  Each function is ``main(argv) -> int``.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "build-zoo": ("rayweights.zoo.cli:main", "build a model zoo into weight-block tables (Ray Data)"),
    "train-generator": ("rayweights.train.cli:main", "train a weight generator (Ray Train + DeepSpeed)"),
    "sample-weights": ("rayweights.sampling:main", "sample weights for conditions, reassembled to safetensors"),
    "evaluate": ("rayweights.evaluation.cli:main", "fine-tune sampled vs baseline initialisations, report"),
    "diagnose-generator": ("rayweights.evaluation.diagnostics:main",
                           "a generator's samples vs its zoo: NN distances, reconstruction, statistics, validity"),
    "sweep": ("rayweights.sweep:main", "Ray Tune sweep over a tune_spaces/*.yaml space"),
    "learngene": ("rayweights.learngene.cli:main", "FINE learngene initialisation of variable-sized models"),
    "run-all": ("rayweights.pipeline:main", "the whole pipeline end to end on one config"),
    "zoo-info": ("rayweights.table:info_main", "print a zoo's layout, members and failures"),
    "compact": ("rayweights.table:compact_main", "compact a zoo's member files under a new manifest version"),
    "vacuum": ("rayweights.table:vacuum_main",
               "delete a zoo's superseded and unreferenced files older than the retention window"),
    "zoo-files": ("rayweights.table:files_main", "print the files a zoo's current manifest reads (for duckdb, polars)"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: rayweights <command> [args...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"rayweights: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    target = COMMANDS[name][0]
    module, func = target.split(":")
    try:
        fn = getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as exc:
        print(f"rayweights: command {name!r} is not available in this install ({exc})", file=sys.stderr)
        return 2
    return int(fn(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
