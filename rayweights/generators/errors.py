"""The one error class of the generators package (its own module so every layer of it can raise it)."""

from __future__ import annotations

__all__ = ["GeneratorError"]


class GeneratorError(ValueError):
    """A generator cannot be built, trained on this table, or loaded (the message names why)."""
