"""One way to print a number in a markdown table cell, shared by every report and benchmark."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["cell"]


def cell(v: Any, nd: int = 4, style: str = "f") -> str:
    """``None`` -> "—", bools -> yes/no, integers as is, floats with ``nd`` digits (``style`` "f":
    fixed decimals, "g": significant digits), NaN -> "n/a", infinity -> "∞"."""
    if v is None:
        return "—"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if math.isnan(v):
            return "n/a"
        if math.isinf(v):
            return "∞" if v > 0 else "-∞"
        return f"{v:.{nd}{style}}"
    return str(v)
