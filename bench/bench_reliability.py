"""Bad input and injected faults against the jobs: runs each case as a user would (``rayweights
<command> ...`` in a fresh process) and prints one markdown row per case:
case | command | exit | first line | nothing half-written.

    python bench/bench_reliability.py [--skip-ray]

"nothing half-written" compares the files under the case's sandbox folder before and after the
command (cases that are meant to write, e.g. a resume, list what they wrote).  The zoos used here
are tiny: synthetic members written with ZooWriter, and one real 4-member digits zoo (--no-ray).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

TINY = "jobs/specs/tiny.yaml"
PARTIAL = "jobs/specs/partial_bn.yaml"
PDIFF = "jobs/configs/pdiff_tiny.yaml"
SPACE = "tune_spaces/block_size.yaml"


def synthetic_zoo(uri: str, n: int = 4) -> None:
    from rayweights.blocks import WeightLayout
    from rayweights.table import CheckpointRecord, ZooWriter

    g = torch.Generator().manual_seed(0)
    sd = lambda: {"a.weight": torch.randn(8, 4, generator=g), "a.bias": torch.randn(8, generator=g)}   # noqa: E731
    w = ZooWriter.create(uri, WeightLayout.from_state_dict(sd(), rule=1, block_size=8))
    for m in range(n):
        w.write_member(f"m{m}", f"t{m}", f"digits:{m},{m + 1}", m, [CheckpointRecord(0, sd()), CheckpointRecord(1, sd())])
    w.consolidate()


def corrupt(zoo_dir: Path, truncate: str | None = None, random: str | None = None, entry: str | None = None):
    from rayweights.table import open_zoo

    zoo = open_zoo(str(zoo_dir))
    if truncate:
        f = zoo_dir / zoo._row(truncate)["file"]
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    if random:
        f = zoo_dir / zoo._row(random)["file"]
        f.write_bytes(np.random.default_rng(0).bytes(f.stat().st_size))
    if entry:
        (zoo_dir / "members" / f"{entry}.json").write_text('{"member_id": "' + entry + '", "ta')


def pdiff_export(root: Path) -> tuple[str, str]:
    from rayweights.blocks import WeightLayout
    from rayweights.generators.methods import build_method

    torch.manual_seed(0)
    sd = {"a.weight": torch.randn(8, 4), "a.bias": torch.randn(8)}
    layout = WeightLayout.from_state_dict(sd, rule=1, block_size=8)
    layout = layout.fit_stats(torch.stack([layout.tokenize({k: v + torch.randn_like(v) for k, v in sd.items()})
                                           for _ in range(4)]))
    build_method("pdiff", layout, "tiny").save_pretrained(str(root / "pdiff"))
    other = WeightLayout.from_state_dict({"b.weight": torch.randn(3, 3)}, rule=1, block_size=8)
    (root / "other-layout.json").write_text(other.to_json())
    return str(root / "pdiff"), str(root / "other-layout.json")


def snapshot(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")} if path.exists() else set()


def run(argv: list[str], env: dict | None = None) -> tuple[int, str, str]:
    p = subprocess.run([sys.executable, "-m", "rayweights.cli", *argv], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, **(env or {})}, timeout=900)
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error:") or ln.startswith("Traceback")]
    out = [ln for ln in p.stdout.splitlines() if ln.strip()]
    return p.returncode, (lines[0] if lines else ""), "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-ray", action="store_true", help="skip the embedded-Ray start-up case")
    args = ap.parse_args()
    box = Path(tempfile.mkdtemp(prefix="rwrel"))
    rows = []

    def case(name, argv, watch, expect_written=(), shown=None, env=None, stdout_pick=None):
        before = snapshot(watch)
        rc, first, out = run(argv, env)
        new = sorted(snapshot(watch) - before)
        if stdout_pick:
            first = next((ln.strip() for ln in out.splitlines() if stdout_pick in ln), first) + (
                f" / {first}" if first else "")
        clean = "yes" if not new else ("yes (wrote " + ", ".join(new[:3]) + ")" if set(new) <= set(expect_written)
                                       or expect_written == "*" else "NO: " + ", ".join(new[:4]))
        cmd = "rayweights " + " ".join(shown or argv)
        first = first.replace(str(box) + "/", "").replace(str(box), ".")         # no machine paths in the table
        rows.append((name, cmd, rc, first.replace("|", "\\|")[:170], clean))
        print(f"  {name}: exit {rc}", file=sys.stderr, flush=True)

    # -------------------------------------------------------------- build-zoo
    case("task condition escapes the zoo folder (partial family)",
         ["build-zoo", "--config", PARTIAL, "--set", 'tasks=["../../../escape:0,1,2,3,4"]', "--set", "held_out=[]",
          "--output", str(box / "a/b/c/zoo"), "--no-ray"], box,
         shown=["build-zoo", "--config", PARTIAL, "--set", "'tasks=[\"../../../escape:0,1,2,3,4\"]'", "--set",
                "'held_out=[]'", "--output", "a/b/c/zoo"])
    case("task condition escapes (dataset-subsets family)",
         ["build-zoo", "--config", TINY, "--set", 'tasks=["../../x:0,1,2,3,4"]', "--set", "held_out=[]",
          "--output", str(box / "z2"), "--no-ray"], box,
         shown=["build-zoo", "--config", TINY, "--set", "'tasks=[\"../../x:0,1,2,3,4\"]'", "--set", "'held_out=[]'",
                "--output", "z2"])
    case("unknown --set key", ["build-zoo", "--config", TINY, "--set", "colour=blue", "--output", str(box / "z3")],
         box, shown=["build-zoo", "--config", TINY, "--set", "colour=blue", "--output", "z3"])
    case("output not writable", ["build-zoo", "--config", TINY, "--output", "/proc/x/zoo"], box)

    # -------------------------------------------------------------- zoo integrity
    zoo = box / "zoo"
    synthetic_zoo(str(zoo))
    corrupt(zoo, truncate="m1", random="m2")
    case("zoo-info on a zoo with a truncated and a random-bytes member", ["zoo-info", str(zoo)], box,
         shown=["zoo-info", "zoo"], stdout_pick="members,")
    case("zoo-info --verify on the same zoo", ["zoo-info", str(zoo), "--verify"], box,
         shown=["zoo-info", "zoo", "--verify"])
    zoo2 = box / "zoo2"
    synthetic_zoo(str(zoo2))
    corrupt(zoo2, entry="m1")
    case("zoo-info with one torn manifest entry", ["zoo-info", str(zoo2)], box, shown=["zoo-info", "zoo2"],
         stdout_pick="corrupt manifest")
    case("train-generator on a zoo with bad member files",
         ["train-generator", "--config", PDIFF, "--set", f"zoo={zoo}", "--output", str(box / "runs"),
          "--no-progress"], box, shown=["train-generator", "--config", PDIFF, "--set", "zoo=zoo", "--output", "runs"])

    # a real zoo: build, corrupt two members and one entry, resume
    real = box / "digits"
    fast = ["--set", "max_tasks=2", "--set", "members_per_task=2", "--set", "hparams.epochs=[2,2]", "--set",
            "keep_last=1", "--no-progress", "--no-ray"]
    rc, first, out = run(["build-zoo", "--config", TINY, "--output", str(real), *fast])
    assert rc == 0, first
    from rayweights.table import open_zoo
    ids = open_zoo(str(real)).members.column("member_id").to_pylist()
    corrupt(real, truncate=ids[0], random=ids[1], entry=ids[2])
    case("build-zoo resume after truncating one member, random bytes in another, a torn entry of a third",
         ["build-zoo", "--config", TINY, "--output", str(real), *fast], box, expect_written="*",
         shown=["build-zoo", "--config", TINY, "--output", "digits", "..."], stdout_pick="done,")
    case("zoo-info --verify after that resume", ["zoo-info", str(real), "--verify"], box,
         shown=["zoo-info", "digits", "--verify"], stdout_pick="verify:")

    # -------------------------------------------------------------- train-generator
    for name, over in (("bad model keyword", "model.denoiser.no_such_kwarg=3"),
                       ("bad scheduler keyword", "scheduler.beta_sched=linear")):
        case(f"train-generator: {name}", ["train-generator", "--config", PDIFF, "--set", f"zoo={real}", "--set", over,
                                          "--output", str(box / "runs")], box,
             shown=["train-generator", "--config", PDIFF, "--set", over, "..."])

    # -------------------------------------------------------------- sweep
    (box / "file").write_text("x")
    case("sweep --output under /proc", ["sweep", "--space", SPACE, "--output", "/proc/x"], box)
    case("sweep --output under a file", ["sweep", "--space", SPACE, "--output", str(box / "file/sweep")], box,
         shown=["sweep", "--space", SPACE, "--output", "file/sweep"])
    case("sweep: bad value inside fixed.train_set", ["sweep", "--space", SPACE, "--set", 'fixed.train_set=["lr=-1"]',
                                                     "--output", str(box / "sw")], box,
         shown=["sweep", "--space", SPACE, "--set", "'fixed.train_set=[\"lr=-1\"]'", "--output", "sw"])
    case("sweep: unknown key inside fixed.zoo_set", ["sweep", "--space", SPACE, "--set",
                                                     'fixed.zoo_set=["members_per_taks=1"]', "--output", str(box / "sw")],
         box, shown=["sweep", "--space", SPACE, "--set", "'fixed.zoo_set=[\"members_per_taks=1\"]'", "..."])

    # -------------------------------------------------------------- sample-weights
    gen, other = pdiff_export(box)
    case("sample-weights: layout that does not match the generator",
         ["sample-weights", "--set", f"generator={gen}", "--set", f"layout={other}", "--output", str(box / "s")], box,
         shown=["sample-weights", "--set", "generator=pdiff", "--set", "layout=other-layout.json", "--output", "s"])
    case("sample-weights: a condition for an unconditional generator",
         ["sample-weights", "--set", f"generator={gen}", "--set", 'conditions=["digits:0,1"]', "--output",
          str(box / "s")], box,
         shown=["sample-weights", "--set", "generator=pdiff", "--set", "'conditions=[\"digits:0,1\"]'", "--output", "s"])

    # -------------------------------------------------------------- configs are code
    case("evaluate: family=os:system (module:factory) without allow_import",
         ["evaluate", "--set", f"zoo={real}", "--set", "family=os:system", "--set", f"samples={box / 's'}",
          "--output", str(box / "e")], box, shown=["evaluate", "--set", "family=os:system", "..."])
    case("learngene: constructor=os:system without allow_import",
         ["learngene", "--config", "jobs/configs/learngene_resnet.yaml", "--set", "constructor=os:system",
          "--output", str(box / "lg")], box,
         shown=["learngene", "--config", "jobs/configs/learngene_resnet.yaml", "--set", "constructor=os:system", "..."])
    case("run-all: unknown --set key", ["run-all", "--set", "epochz=3", "--output", str(box / "p")], box,
         shown=["run-all", "--set", "epochz=3", "--output", "p"])

    # -------------------------------------------------------------- embedded Ray
    if not args.skip_ray:
        tmp = Path(tempfile.mkdtemp(prefix="rw", dir="/tmp"))
        (tmp / "ray").mkdir()
        (tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:1\n")
        code = ("import ray; from rayweights.runtime import ray_init; ray_init(); "
                "print('started an embedded Ray at', ray.get_runtime_context().gcs_address); ray.shutdown()")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(RAY_TMPDIR=str(tmp), PYTHONPATH=str(ROOT), RAY_gcs_rpc_server_reconnect_timeout_s="20")
        p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        first = next((ln for ln in p.stdout.splitlines() if "started" in ln), p.stderr.strip().splitlines()[-1:])
        first = "started an embedded Ray" if "started" in str(first) else str(first)
        rows.append(("stale `ray_current_cluster` file naming a dead cluster (RAY_TMPDIR holds it)",
                     "python -c 'from rayweights.runtime import ray_init; ray_init()'", p.returncode, first, "yes"))
        shutil.rmtree(tmp, ignore_errors=True)

    print("| case | command | exit | first line | nothing half-written |")
    print("|---|---|---|---|---|")
    for name, cmd, rc, first, clean in rows:
        print(f"| {name} | `{cmd}` | {rc} | {first or '(none)'} | {clean} |")
    shutil.rmtree(box, ignore_errors=True)


if __name__ == "__main__":
    main()
