"""The package's layer contract (docs/ARCHITECTURE.md): import-linter over rayweights with the
contract in pyproject.toml. A stage importing a stage above it, or a cycle, fails here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _lint(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([str(exe), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_imports_follow_the_layers():
    res = _lint()
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "2 kept, 0 broken" in res.stdout


def test_the_contracts_catch_an_upward_import_and_a_cycle(tmp_path):
    """The contracts can fail: a copy of the package where a module of the table layer imports the
    generators, and two sibling modules import each other."""
    import shutil

    pkg = tmp_path / "rayweights"
    shutil.copytree(ROOT / "rayweights", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "table_upward.py").write_text("from rayweights import generators  # noqa: F401\n")
    (pkg / "cycle_a.py").write_text("from rayweights import cycle_b  # noqa: F401\n")
    (pkg / "cycle_b.py").write_text("from rayweights import cycle_a  # noqa: F401\n")
    lines, keep = [], False
    for line in (ROOT / "pyproject.toml").read_text().splitlines():
        if line.startswith("["):
            keep = "tool.importlinter" in line
        if keep:
            lines.append(line)
    contract = "\n".join(lines)
    assert '"rayweights.table",' in contract
    (tmp_path / ".importlinter.toml").write_text(contract.replace('"rayweights.table",',
                                                                  '"rayweights.table | rayweights.table_upward",'))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    exe = Path(sys.executable).with_name("lint-imports")
    res = subprocess.run([str(exe), str(tmp_path / ".importlinter.toml")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0, res.stdout[-3000:]
    assert "rayweights.table_upward -> rayweights.generators" in res.stdout, res.stdout[-3000:]
    assert "0 kept, 2 broken" in res.stdout and "cycle_a" in res.stdout, res.stdout[-3000:]


def test_what_ray_data_processes_unpickle_imports_no_models():
    """Ray Data's processes import ``rayweights.train.data`` (its batch functions) and the table
    reader: neither may pull in the generators (diffusers) or scikit-learn, which cost each such
    process ~10 s on 2 cores; the public names of ``rayweights.train`` still resolve."""
    code = ("import sys, rayweights.train.data, rayweights.table; "
            "heavy = [m for m in ('diffusers', 'sklearn', 'rayweights.generators') if m in sys.modules]; "
            "from rayweights.train import GeneratorTrainConfig, train_generator, TrainError; "
            "print(heavy, GeneratorTrainConfig.__name__, train_generator.__module__, TrainError.__name__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["[]", "GeneratorTrainConfig", "rayweights.train.trainer", "TrainError"], out.stdout
