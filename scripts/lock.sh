#!/usr/bin/env bash
# Refresh the dependency lock after editing pyproject.toml:   bash scripts/lock.sh
# Check that the committed lock matches pyproject.toml:      bash scripts/lock.sh --check
#
# uv.lock is the resolved set (Linux x86_64, CPython 3.10-3.12; see [tool.uv] in pyproject.toml).
# requirements.lock is the same set exported as pinned requirements, which scripts/install.sh installs
# with --no-deps, so an install never resolves anything (and plain pip can install it too).
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-uv}
export_lock() {
  "$UV" export --quiet --frozen --no-hashes --extra dev --no-emit-project --no-header --no-annotate "$@"
}
if [ "${1:-}" = "--check" ]; then
  "$UV" lock --check --quiet || { echo "error: uv.lock is stale against pyproject.toml: run bash scripts/lock.sh" >&2; exit 1; }
  diff -u requirements.lock <(export_lock) >&2 \
    || { echo "error: requirements.lock differs from uv.lock: run bash scripts/lock.sh" >&2; exit 1; }
  echo "lock is up to date"
  exit 0
fi
"$UV" lock
export_lock -o requirements.lock
echo "wrote uv.lock and requirements.lock"
