#!/usr/bin/env bash
# Install rayweights from the lock into a fresh virtualenv (default ./.venv), or into the current
# Python with RAYWEIGHTS_VENV=none (container images, cluster nodes with a prepared Python).
#
#   bash scripts/install.sh                            # creates .venv, then: .venv/bin/python jobs/run_all.py
#   RAYWEIGHTS_VENV=/tmp/ci/venv bash scripts/install.sh
#   RAYWEIGHTS_VENV=none PYTHON=python3 bash scripts/install.sh
#
# Nothing is resolved at install time: every package is pinned in requirements.lock (exported from
# uv.lock by scripts/lock.sh) and installed with --no-deps. Order matters:
#   1. torch + torchvision, with pip, so that a local wheel mirror configured for pip is used;
#   2. DeepSpeed without build isolation (its setup imports the installed torch; uv caches the wheel);
#   3. the rest of the lock;  4. this package, editable.
# uv (a PyPI package, pinned below) does steps 2-4 when it can be installed; plain pip is the fallback
# (RAYWEIGHTS_INSTALLER=pip forces it).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
UV_VERSION=0.13.9
LOCK=requirements.lock
VENV=${RAYWEIGHTS_VENV:-.venv}
INSTALLER=${RAYWEIGHTS_INSTALLER:-uv}

t_all=$SECONDS
step() { echo "[install] $*"; t_step=$SECONDS; }
done_step() { echo "[install]   done in $((SECONDS - t_step)) s"; }

[ -f "$LOCK" ] || { echo "error: $LOCK not found (run bash scripts/lock.sh)" >&2; exit 2; }
pin() {  # the locked version of one package, e.g. pin torch -> 2.14.1
  local v
  v=$(sed -n "s/^$1==\([^ ;]*\).*/\1/p" "$LOCK" | head -n 1)
  [ -n "$v" ] || { echo "error: $1 is not pinned in $LOCK" >&2; exit 2; }
  echo "$v"
}

if [ "$VENV" = none ]; then
  PY=${PYTHON:-python3}
else
  step "virtualenv $VENV"
  [ -x "$VENV/bin/python" ] || ${PYTHON:-python3} -m venv "$VENV"
  PY="$VENV/bin/python"
  done_step
fi
PY=$(command -v "$PY")
export VIRTUAL_ENV=$("$PY" -c 'import sys; print(sys.prefix)')

step "build tools, uv $UV_VERSION"
"$PY" -m pip install -q "setuptools==$(pin setuptools)" wheel
if [ "$INSTALLER" = uv ] && ! "$PY" -m pip install -q "uv==$UV_VERSION"; then
  echo "[install]   uv could not be installed: falling back to pip"
  INSTALLER=pip
fi
done_step

if [ "$INSTALLER" = uv ]; then
  # uv does not read pip's configuration: hand it the same indexes / wheel folders pip would use
  # (a mirror or a local wheel folder set up for pip), each version still pinned by the lock.
  UV_ARGS=(--python "$PY" --index-strategy unsafe-best-match)
  for url in $("$PY" -m pip config get global.extra-index-url 2>/dev/null || true); do UV_ARGS+=(--extra-index-url "$url"); done
  for url in $("$PY" -m pip config get global.index-url 2>/dev/null || true); do UV_ARGS+=(--index-url "$url"); done
  for dir in ${PIP_FIND_LINKS:-} $("$PY" -m pip config get global.find-links 2>/dev/null || true); do UV_ARGS+=(--find-links "$dir"); done
  pkg_install() { "$PY" -m uv pip install -q --no-deps "${UV_ARGS[@]}" "$@"; }
else
  pkg_install() { "$PY" -m pip install -q --no-deps "$@"; }
fi

step "torch $(pin torch), torchvision $(pin torchvision) ($INSTALLER)"
# With pip, torch's own pinned CUDA libraries come along here (resolved against torch's exact pins).
if [ "$INSTALLER" = uv ]; then
  pkg_install "torch==$(pin torch)" "torchvision==$(pin torchvision)"
else
  "$PY" -m pip install -q "torch==$(pin torch)" "torchvision==$(pin torchvision)"
fi
done_step

step "deepspeed $(pin deepspeed) (no build isolation, against the installed torch)"
pkg_install --no-build-isolation "deepspeed==$(pin deepspeed)"
done_step

step "the rest of $LOCK ($INSTALLER, --no-deps: nothing is resolved)"
pkg_install -r "$LOCK"
done_step

step "rayweights (editable)"
pkg_install --no-build-isolation -e .
done_step

"$PY" -m pip check >/dev/null || { "$PY" -m pip check >&2; echo "error: installed set is inconsistent" >&2; exit 1; }
echo "[install] rayweights installed in $((SECONDS - t_all)) s: $("$PY" -c 'import rayweights, torch, ray, deepspeed; print("torch", torch.__version__, "ray", ray.__version__, "deepspeed", deepspeed.__version__)' 2>/dev/null | tail -n 1)"
echo "[install] python: $PY"
