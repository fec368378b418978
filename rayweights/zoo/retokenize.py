"""A built zoo under another block size or grouping rule, without retraining its members."""

from __future__ import annotations

import dataclasses
import json

from ..config import ConfigError, to_dict
from ..storage import read_bytes, resolve
from ..table import retokenize
from .builder import zoo_layout
from .spec import read_zoo_spec

__all__ = ["retokenize_zoo"]


def retokenize_zoo(src: str, dst: str, block_size: int | None = None, rule: int | str | None = None,
                   show_progress: bool = False) -> str:
    """Write the members of zoo ``src`` into a new zoo ``dst`` with another block size and/or grouping
    rule (same members, checkpoints and metrics: nothing is retrained).  The family's caches (base
    models, features) are copied; ``zoo_spec.json`` is rewritten with the new layout values.
    Idempotent (:func:`rayweights.table.retokenize`): a finished ``dst`` is returned as is."""
    spec, _ = read_zoo_spec(src)
    if spec is None:
        raise ConfigError(f"zoo: {resolve(src).join('zoo_spec.json').describe()} is missing "
                          "(re-tokenising needs the spec)")
    meta = json.loads(read_bytes(resolve(src).join("zoo_spec.json")))
    spec = dataclasses.replace(spec, output=dst, block_size=int(block_size or spec.block_size),
                               rule=spec.rule if rule is None else rule)
    new_meta = {**meta, "spec": to_dict(spec), "retokenized_from": src}
    retokenize(src, dst, zoo_layout(spec), files={"zoo_spec.json": json.dumps(new_meta, indent=1).encode()},
               show_progress=show_progress)
    return dst
