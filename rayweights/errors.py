"""One error path for every command line.

* :class:`UserError` is the base of every *expected* error: bad input (a config field, a file, a
  URI, a corrupt member) that the user can fix.  Its message names the field or file; its
  ``exit_code`` is 2.  The stage errors (``ConfigError``, ``StorageError``, ``ZooError``,
  ``TrainError``, ``SamplingError``, ...) derive from it.
* :func:`run_main` wraps every job's ``main``: an expected error prints one line
  (``error: <message>``) to stderr and exits with its code; anything else is a bug or an
  infrastructure failure and prints its traceback, exit 1.
"""

from __future__ import annotations

import contextlib
import functools
import re
import sys
import traceback
from typing import Callable, Sequence

__all__ = ["UserError", "JobFailed", "run_main", "job_main", "expected", "check_id", "ID_PATTERN"]


class UserError(Exception):
    """An expected, user-fixable error: one line naming the field or file; exit code 2."""

    exit_code = 2


class JobFailed(UserError):
    """The job started but did not succeed (e.g. members or a training stage failed); exit 1, one line."""

    exit_code = 1


def _one_line(exc: BaseException) -> str:
    msg = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    lines = [ln for ln in msg.strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def run_main(fn: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run ``fn(argv)``; expected errors -> one line + their exit code, others -> traceback + 1."""
    try:
        return int(fn(argv) or 0)
    except UserError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 2))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except BaseException:  # noqa: BLE001 - unexpected: the full traceback, exit 1
        traceback.print_exc()
        return 1


def job_main(fn: Callable[..., int | None]) -> Callable[..., int]:
    """Decorator form of :func:`run_main` for ``main(argv=None) -> int``."""

    @functools.wraps(fn)
    def wrapper(argv: Sequence[str] | None = None) -> int:
        return run_main(fn, argv)

    return wrapper


@contextlib.contextmanager
def expected(*types: type[BaseException]):
    """Inside this block, exceptions of ``types`` (e.g. a ``ValueError('field: why')`` from a
    ``__post_init__`` or a pre-flight check) are expected errors: re-raised as :class:`UserError`."""
    try:
        yield
    except UserError:
        raise
    except types as exc:
        raise UserError(_one_line(exc)) from exc


# ---------------------------------------------------------------------- ids that become paths
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.,=+-]{0,199}$")


def check_id(value: object, field: str) -> str:
    """The one check for every id that becomes part of a storage path (task, member, concept, run,
    sample, trial): letters, digits and ``_ . , = + -``, starting with a letter or digit, at most
    200 characters; so never ``/``, ``\\``, ``.``/``..``, spaces or control characters.  Raises ``ValueError``
    naming ``field`` (which the config loader turns into a one-line ConfigError)."""
    if not isinstance(value, str) or not ID_PATTERN.match(value):
        raise ValueError(f"{field}: {value!r} cannot be used in a file name (letters, digits and '_ . , = + -', "
                         "starting with a letter or digit; no '/', '..' or spaces)")
    return value
