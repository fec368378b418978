"""Task adapters by family: ``make_adapter(family, condition, zoo, options) -> TaskAdapter``.

A family is a registered name (``register_adapter``) or a ``"package.module:factory"`` import
string; a factory is ``factory(condition: str, zoo: Zoo, **options) -> TaskAdapter``.
The built-in families live in :mod:`rayweights.evaluation.families` and are registered on import.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping

from .protocols import TaskAdapter
from ..errors import UserError

__all__ = ["register_adapter", "make_adapter", "ADAPTERS", "AdapterError", "known_families"]

ADAPTERS: dict[str, Callable[..., TaskAdapter]] = {}


class AdapterError(UserError, ValueError):
    """Unknown family or a task condition the family cannot build (the message names it)."""


def register_adapter(family: str):
    def deco(fn):
        ADAPTERS[family] = fn
        return fn

    return deco


def _load_builtin():
    try:
        from . import families  # noqa: F401  (registers the built-in families)
    except ImportError as exc:       # a family's dependencies (e.g. rayweights.zoo) are missing
        return exc
    return None


def known_families() -> list[str]:
    _load_builtin()
    return sorted(ADAPTERS)


def make_adapter(family: str, condition: str, zoo, options: Mapping[str, Any] | None = None) -> TaskAdapter:
    problem = _load_builtin()
    if ":" in family and family not in ADAPTERS:
        mod, _, fn = family.rpartition(":")
        try:
            factory = getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError) as exc:
            raise AdapterError(f"family: cannot import {family!r}: {exc}") from exc
    elif family in ADAPTERS:
        factory = ADAPTERS[family]
    else:
        hint = f" (built-in families unavailable: {problem})" if problem else ""
        raise AdapterError(f"family: unknown {family!r} (known: {sorted(ADAPTERS)}; or 'module:factory'){hint}")
    try:
        return factory(condition, zoo, **dict(options or {}))
    except TypeError as exc:
        raise AdapterError(f"family_options for {family!r}: {exc}") from exc
