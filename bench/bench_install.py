"""How long a fresh machine takes to get rayweights: resolution and a full install from the lock.

    python bench/bench_install.py                 # uv resolution (cold cache), install cold and warm
    python bench/bench_install.py --pip           # + the pip fallback installer
    python bench/bench_install.py --pip-resolver  # + what pip's resolver does with pyproject's ranges

Each install goes into a brand-new virtualenv in a temporary folder, exactly as `.ci/run` does
(`RAYWEIGHTS_VENV=<tmp> bash scripts/install.sh`); "cold" also starts uv with an empty cache, as a
new machine would. Prints one table, per-step seconds as install.sh reports them.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEP = re.compile(r"^\[install\] (?!  done)(.*)$")
DONE = re.compile(r"^\[install\]   done in (\d+) s$")


def _run(cmd: list[str], env: dict | None = None, timeout: int = 1800) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    return time.perf_counter() - t0, proc


def _steps(out: str) -> dict[str, int]:
    steps, name = {}, None
    for line in out.splitlines():
        if m := DONE.match(line):
            steps[name.split(" (")[0]] = int(m.group(1))
        elif m := STEP.match(line):
            name = m.group(1)
    return steps


def install(tmp: Path, label: str, env: dict) -> tuple[str, float, dict]:
    venv = tmp / f"venv-{label}"
    secs, proc = _run(["bash", "scripts/install.sh"], {"RAYWEIGHTS_VENV": str(venv), **env})
    if proc.returncode != 0:
        raise SystemExit(f"install ({label}) failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return label, secs, _steps(proc.stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pip", action="store_true", help="also time the pip fallback installer")
    ap.add_argument("--pip-resolver", action="store_true", help="also time pip resolving pyproject's ranges")
    args = ap.parse_args()
    uv = [sys.executable, "-m", "uv"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="rw-install-") as tmp:
        tmp = Path(tmp)
        cold_cache = {"UV_CACHE_DIR": str(tmp / "uv-cache")}
        secs, proc = _run([*uv, "pip", "compile", "pyproject.toml", "--extra", "dev", "--universal", "--quiet",
                           "-o", str(tmp / "resolved.txt")], cold_cache)
        rows.append(("resolve pyproject (uv, empty cache)", secs, "ok" if proc.returncode == 0 else "failed", {}))
        if args.pip_resolver:
            secs, proc = _run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q",
                               "--report", str(tmp / "pip.json"), ".[dev]"], timeout=900)
            err = proc.stderr
            verdict = ("ResolutionImpossible" if "ResolutionImpossible" in err
                       else "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})")
            rows.append(("resolve pyproject (pip)", secs, verdict, {}))
        label, secs, steps = install(tmp, "cold", cold_cache)
        rows.append(("install from lock, uv, empty cache", secs, "ok", steps))
        label, secs, steps = install(tmp, "warm", cold_cache)
        rows.append(("install from lock, uv, warm cache", secs, "ok", steps))
        if args.pip:
            label, secs, steps = install(tmp, "pip", {"RAYWEIGHTS_INSTALLER": "pip"})
            rows.append(("install from lock, pip fallback", secs, "ok", steps))
    names = ["virtualenv", "build tools, uv", "torch", "deepspeed", "the rest of requirements.lock", "rayweights"]
    print(f"{os.cpu_count()} cores; goal: full install into a fresh venv <= 120 s\n")
    print("| what | total s | result | " + " | ".join(names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    for what, secs, verdict, steps in rows:
        cells = [next((str(v) for k, v in steps.items() if k.startswith(n)), "-") for n in names]
        print(f"| {what} | {secs:.1f} | {verdict} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
