"""bench/gpu_check.sh, the prepared GPU check: its CPU dry run exercises every row's code path and writes
the table; a failing row is recorded in the table instead of ending the check."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, env=None, timeout=600):
    return subprocess.run(["bash", "bench/gpu_check.sh", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHON": sys.executable, **(env or {})})


@pytest.mark.slow
def test_dry_run_writes_every_row(tmp_path):
    out = tmp_path / "gpu_check.md"
    proc = _run("--dry-run", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = out.read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| row ")]
    kinds = {line.split("|")[1].strip() for line in rows}
    assert kinds == {"sample", "mfu", "zero", "packing"}, table
    assert not any("failed" in line or "timed out" in line for line in rows), table
    assert sum(line.startswith("| zero |") for line in rows) == 4            # ZeRO 0, 1, 2, 3
    assert "dry run" in table


def test_a_failing_row_is_recorded_and_the_rest_still_runs(tmp_path):
    """A budget too small for any row: every row is reported as not run, the file exists, exit 1."""
    out = tmp_path / "t.md"
    proc = _run("--dry-run", "--out", str(out), "--budget", "5", timeout=120)
    assert proc.returncode == 1
    table = out.read_text()
    assert table.count("not run: the time budget") == 4, table


def test_unknown_option_is_one_clear_line():
    proc = _run("--bogus", timeout=60)
    assert proc.returncode == 2 and "unknown option --bogus" in proc.stderr
