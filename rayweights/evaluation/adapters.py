"""Task adapters by family: ``make_adapter(family, condition, zoo, options) -> TaskAdapter``.

A family is a registered name (``register_adapter``) or a ``"package.module:factory"`` import
string; a factory is ``factory(condition: str, zoo: Zoo, **options) -> TaskAdapter``.
The built-in families live in :mod:`rayweights.evaluation.families`, registered when the
``rayweights.evaluation`` package is imported.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, Mapping

from .protocols import TaskAdapter
from ..errors import UserError

__all__ = ["register_adapter", "make_adapter", "ADAPTERS", "AdapterError", "known_families", "adapter_options",
           "check_family_options"]

ADAPTERS: dict[str, Callable[..., TaskAdapter]] = {}


class AdapterError(UserError, ValueError):
    """Unknown family or a task condition the family cannot build (the message names it)."""


def register_adapter(family: str):
    def deco(fn):
        ADAPTERS[family] = fn
        return fn

    return deco


def known_families() -> list[str]:
    return sorted(ADAPTERS)


def adapter_options(family: str) -> set[str] | None:
    """The option names the factory of a registered ``family`` accepts (its keyword parameters after
    ``condition, zoo``, or its ``options`` attribute); None when not known (``module:factory``, ``**``)."""
    factory = ADAPTERS.get(family)
    if factory is None:
        return None
    if getattr(factory, "options", None) is not None:
        return set(factory.options)
    params = list(inspect.signature(factory).parameters.values())
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params[2:]}


def check_family_options(family: str, options: Mapping[str, Any], field: str = "family_options") -> None:
    """Unknown keys of ``options`` for ``family`` (every built-in family's when ``family`` is "", the
    zoo's family decided later) raise ``ValueError("<field>.<key>: ...")``, before any work."""
    if family:
        known = adapter_options(family)
    else:
        per = [adapter_options(f) for f in known_families()]
        known = None if any(k is None for k in per) else set().union(*per)
    if known is None:
        return
    bad = sorted(set(options) - known)
    if bad:
        who = f"family {family!r}" if family else "any built-in family"
        raise ValueError(f"{field}.{bad[0]}: unknown option for {who} (known: {', '.join(sorted(known))})")


def make_adapter(family: str, condition: str, zoo, options: Mapping[str, Any] | None = None) -> TaskAdapter:
    if ":" in family and family not in ADAPTERS:
        mod, _, fn = family.rpartition(":")
        try:
            factory = getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError) as exc:
            raise AdapterError(f"family: cannot import {family!r}: {exc}") from exc
    elif family in ADAPTERS:
        factory = ADAPTERS[family]
    else:
        raise AdapterError(f"family: unknown {family!r} (known: {sorted(ADAPTERS)}; or 'module:factory')")
    try:
        return factory(condition, zoo, **dict(options or {}))
    except TypeError as exc:
        raise AdapterError(f"family_options for {family!r}: {exc}") from exc
