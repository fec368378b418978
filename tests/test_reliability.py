"""Bad input and injected faults across the jobs: every check happens before Ray starts (no Ray is
launched here, except by the one test of the embedded start-up), errors are one line with exit 2,
nothing is half written, and corrupt zoo members are found and rebuilt."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from rayweights.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "jobs" / "specs" / "tiny.yaml"
PARTIAL = ROOT / "jobs" / "specs" / "partial_bn.yaml"
PDIFF = ROOT / "jobs" / "configs" / "pdiff_tiny.yaml"

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture()
def no_ray(monkeypatch):
    """Starting Ray is a test failure: these checks must happen before it."""
    import rayweights.runtime

    def boom(*a, **k):
        raise AssertionError("Ray was started before the input was checked")

    monkeypatch.setattr(rayweights.runtime, "ray_init", boom)


def files_under(path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in Path(path).rglob("*")) if Path(path).exists() else []


# ----------------------------------------------------------------------------- 1. path escape
@pytest.mark.parametrize("spec", [PARTIAL, TINY])
def test_task_condition_cannot_escape_the_zoo_folder(tmp_path, capsys, no_ray, spec):
    from rayweights.zoo.cli import main as build_main

    work = tmp_path / "a" / "b" / "c"
    work.mkdir(parents=True)
    out = work / "zoo"
    rc = build_main(["--config", str(spec), "--output", str(out), "--no-ray", "--no-progress",
                     "--set", 'tasks=["../../../escape:0,1,2,3,4"]', "--set", "held_out=[]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "tasks:" in err[0] and "escape" in err[0]
    assert files_under(tmp_path) == ["a", "a/b", "a/b/c"]            # nothing written, inside or outside


def test_ids_that_become_paths_are_checked_in_one_place():
    from rayweights.errors import check_id

    for ok in ("digits-01234", "digits-01234-s1", "grayscale__blur_1-p0", "run.v2", "a,b=c+d"):
        assert check_id(ok, "x") == ok
    for bad in ("../x", "..", ".", "a/b", "a\\b", "", " a", "a b", "-a", "a\nb", "x" * 201):
        with pytest.raises(ValueError, match="^x: "):
            check_id(bad, "x")
    from rayweights.zoo import ZooSpec
    with pytest.raises(ConfigError, match="tasks: .*cannot be used in a file name"):
        load_config(ZooSpec, TINY, ['tasks=["a/b:0,1,2,3,4"]', "held_out=[]"])


# ----------------------------------------------------------------------------- 2/3. zoo resume
def test_build_resume_rebuilds_only_corrupt_members(tmp_path):
    from rayweights.table import open_zoo
    from rayweights.zoo import ZooSpec, build_zoo

    uri = str(tmp_path / "zoo")
    spec = load_config(ZooSpec, TINY, ["max_tasks=2", "members_per_task=2", "hparams.epochs=[2,2]", "keep_last=1",
                                       f"output={uri}"])
    first = build_zoo(spec, use_ray=False, progress=False)
    assert (first.done, first.skipped) == (4, 0)
    zoo = open_zoo(uri)
    ids = zoo.members.column("member_id").to_pylist()
    f0, f1 = tmp_path / "zoo" / zoo._row(ids[0])["file"], tmp_path / "zoo" / zoo._row(ids[1])["file"]
    f0.write_bytes(f0.read_bytes()[: f0.stat().st_size // 2])               # truncated
    f1.write_bytes(np.random.default_rng(1).bytes(f1.stat().st_size))       # random bytes
    (tmp_path / "zoo" / "members" / f"{ids[2]}.json").write_text("{not json")  # corrupt manifest entry
    again = build_zoo(spec, use_ray=False, progress=False)
    assert (again.done, again.skipped, again.failed) == (3, 1, 0)
    zoo = open_zoo(uri)
    assert len(zoo) == 4 and zoo.verify() == [] and not zoo.corrupt_entries
    assert zoo.blocks().shape[0] == 4


# ----------------------------------------------------------------------------- 4. train on a bad zoo
def _bad_zoo(tmp_path):
    from rayweights.blocks import WeightLayout
    from rayweights.table import CheckpointRecord, ZooWriter, open_zoo

    g = torch.Generator().manual_seed(0)
    sd = lambda: {"a.weight": torch.randn(8, 4, generator=g), "a.bias": torch.randn(8, generator=g)}   # noqa: E731
    uri = str(tmp_path / "zoo")
    w = ZooWriter.create(uri, WeightLayout.from_state_dict(sd(), rule=1, block_size=8))
    for m in range(4):
        w.write_member(f"m{m}", f"t{m}", f"digits:{m},{m + 1}", m, [CheckpointRecord(0, sd()), CheckpointRecord(1, sd())])
    f = tmp_path / "zoo" / open_zoo(uri)._row("m2")["file"]
    f.write_bytes(f.read_bytes()[:100])
    return uri


def test_train_on_a_zoo_with_a_bad_file_fails_before_training(tmp_path, capsys, no_ray):
    from rayweights.train.cli import main as train_main

    uri = _bad_zoo(tmp_path)
    runs = tmp_path / "runs"
    rc = train_main(["--config", str(PDIFF), "--set", f"zoo={uri}", "--output", str(runs), "--no-progress"])
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if not ln[:4].isdigit()]   # log lines
    assert rc == 2 and err[-1].startswith("error: zoo: 1 member file(s) fail the check: m2 (blocks/task=t2/")
    assert not runs.exists()                                 # no empty run folder left behind


def test_train_preflight_can_skip_bad_members(tmp_path):
    from rayweights.train.config import GeneratorTrainConfig
    from rayweights.train.trainer import preflight

    uri = _bad_zoo(tmp_path)
    cfg = load_config(GeneratorTrainConfig, PDIFF, [f"zoo={uri}", f"storage={tmp_path / 'runs'}",
                                                    "skip_bad_members=true", "batch_size=2", "stats_members=4"])
    plan = preflight(cfg)
    assert sorted(plan.zoo.members.column("member_id").to_pylist()) == ["m0", "m1", "m3"]


# ----------------------------------------------------------------------------- 5. checks that came too late
@pytest.mark.parametrize("override,field", [
    ("model.denoiser.no_such_kwarg=3", "model.denoiser.no_such_kwarg"),
    ("model.autoencoder.chanels=[4,4]", "model.autoencoder.chanels"),
])
def test_model_and_scheduler_keywords_checked_at_load(override, field, tmp_path, capsys, no_ray):
    from rayweights.train.cli import main as train_main

    rc = train_main(["--config", str(PDIFF), "--set", "zoo=/nonexistent", "--set", override,
                     "--output", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: ") and f"{field}: not a keyword of" in err[-1]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("override,message", [
    ("scheduler.beta_sched=linear", "scheduler.beta_sched: unknown key"),
    ("scheduler.prediction_type=flow", "scheduler.prediction_type: 'flow' is not one of"),
    ("lr_schedule=cosin", "lr_schedule: 'cosin' is not one of"),
    ("stages.diffusion.lr_schedule=cosin", "stages.diffusion.lr_schedule: 'cosin' is not one of"),
])
def test_typed_scheduler_and_lr_schedule_checked_at_load(override, message, tmp_path, capsys, no_ray):
    from rayweights.train.cli import main as train_main

    rc = train_main(["--config", str(PDIFF), "--set", "zoo=/nonexistent", "--set", override,
                     "--output", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: ") and message in err[-1], err[-1]
    assert not (tmp_path / "runs").exists()


def test_unknown_set_key_is_reported_as_from_set():
    from rayweights.train.config import GeneratorTrainConfig
    from rayweights.zoo import ZooSpec

    with pytest.raises(ConfigError, match=r"^--set colour: unknown key 'colour'"):
        load_config(ZooSpec, TINY, ["colour=blue"])
    with pytest.raises(ConfigError, match=r"^--set hparams\.lrr: unknown key 'lrr' in hparams"):
        load_config(ZooSpec, TINY, ["hparams.lrr=[1,2]"])
    with pytest.raises(ConfigError, match=r"^--set stages\.diffusion\.stepz: unknown key 'stepz'"):
        load_config(GeneratorTrainConfig, PDIFF, ["stages.diffusion.stepz=3"])
    from rayweights.sweep import load_space
    with pytest.raises(ConfigError, match=r"^--set metrc: unknown key 'metrc'"):
        load_space(ROOT / "tune_spaces" / "block_size.yaml", ["metrc=x"])
    # free-form mappings below a field stay free (checked by their owner)
    load_config(GeneratorTrainConfig, PDIFF, ["model.denoiser.layers_per_block=1"])


@pytest.mark.parametrize("output", ["/proc/x/sweep", "{file}/sweep"])
def test_sweep_checks_output_before_ray(output, tmp_path, capsys, monkeypatch, no_ray):
    import rayweights.sweep as sweep

    monkeypatch.setattr(sweep, "run_sweep", lambda *a, **k: pytest.fail("the sweep started"))
    (tmp_path / "file").write_text("x")
    rc = sweep.main(["--space", str(ROOT / "tune_spaces" / "block_size.yaml"),
                     "--output", output.format(file=tmp_path / "file")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: --output: output ") and "not writable" in err[0]


@pytest.mark.s3
def test_sweep_checks_s3_output_before_ray(s3_uri, capsys, monkeypatch, no_ray):
    import rayweights.sweep as sweep

    monkeypatch.setattr(sweep, "run_sweep", lambda *a, **k: pytest.fail("the sweep started"))
    space = ["--space", str(ROOT / "tune_spaces" / "block_size.yaml")]
    bucket = s3_uri.split("/")[2]
    assert sweep.main(space + ["--output", s3_uri.replace(bucket, bucket + "-missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()      # (earlier tests' log handlers may write here too)
    assert err[-1].startswith("error: --output: output s3://") and "bucket" in err[-1]


@pytest.mark.parametrize("override,field", [
    ('fixed.zoo_set=["members_per_taks=1"]', "zoo_set"),
    ('fixed.train_set=["lr=-1"]', "lr"),
    ('fixed.eval_set=["method=sideways"]', "method"),
])
def test_sweep_checks_values_inside_stage_overrides(override, field):
    from rayweights.sweep import load_space

    with pytest.raises(ConfigError, match=f"fixed/space: a trial config is invalid: .*{field}"):
        load_space(ROOT / "tune_spaces" / "block_size.yaml", [override])


@pytest.fixture(scope="module")
def pdiff_export(tmp_path_factory):
    """An untrained (unconditional) p-diff generator export and a layout of another shape."""
    from rayweights.blocks import WeightLayout
    from rayweights.generators.methods import build_method

    torch.manual_seed(0)
    sd = {"a.weight": torch.randn(8, 4), "a.bias": torch.randn(8)}
    layout = WeightLayout.from_state_dict(sd, rule=1, block_size=8)
    layout = layout.fit_stats(torch.stack([layout.tokenize({k: v + torch.randn_like(v) for k, v in sd.items()})
                                           for _ in range(4)]))
    root = tmp_path_factory.mktemp("gen")
    build_method("pdiff", layout, "tiny").save_pretrained(str(root / "pdiff"))
    other = WeightLayout.from_state_dict({"b.weight": torch.randn(3, 3)}, rule=1, block_size=8)
    (root / "other.json").write_text(other.to_json())
    return str(root / "pdiff"), str(root / "other.json")


def test_sample_weights_layout_must_match_and_unconditional_takes_no_condition(pdiff_export, tmp_path, capsys,
                                                                               no_ray):
    from rayweights.sampling import main as sample_main

    gen, other = pdiff_export
    out = tmp_path / "samples"
    assert sample_main(["--set", f"generator={gen}", "--set", f"layout={other}", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: layout: ") and "does not match the generator's layout" in err[0]
    assert sample_main(["--set", f"generator={gen}", "--set", 'conditions=["digits:0,1"]', "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: conditions: ") and "unconditional" in err[0]
    assert not out.exists()


# ----------------------------------------------------------------------------- 6. one error path
def test_every_command_uses_the_one_error_path():
    import importlib

    from rayweights.cli import COMMANDS

    for name, (target, _) in COMMANDS.items():
        mod, fn = target.split(":")
        f = getattr(importlib.import_module(mod), fn)
        assert getattr(f, "__wrapped__", None) is not None, f"{name}: {target} is not wrapped by errors.job_main"


def test_run_main_expected_one_line_exit_2_unexpected_traceback_exit_1(capsys):
    from rayweights.errors import JobFailed, UserError, run_main
    from rayweights.table import ZooError

    def raiser(exc):
        def fn(argv):
            raise exc
        return fn

    assert run_main(raiser(ZooError("zoo: members/m1.json is corrupt\nsecond line"))) == 2
    assert capsys.readouterr().err == "error: zoo: members/m1.json is corrupt\n"
    assert run_main(raiser(UserError("x: bad"))) == 2
    assert run_main(raiser(JobFailed("stage diffusion: training failed"))) == 1
    assert capsys.readouterr().err.splitlines()[-1] == "error: stage diffusion: training failed"
    assert run_main(raiser(ZeroDivisionError("bug"))) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and "ZeroDivisionError: bug" in err
    assert run_main(lambda argv: 0) == 0 and run_main(lambda argv: None) == 0


def test_run_all_reports_stage_errors_in_one_line(monkeypatch, capsys, tmp_path):
    import rayweights.pipeline as pipeline
    from rayweights.table import ZooError
    from rayweights.train.trainer import TrainFailed

    for exc, rc in ((ZooError("zoo: blocks file missing: x.parquet"), 2), (TrainFailed("stage diffusion: boom"), 1),
                    (KeyError("oops"), 1)):
        def run(*a, exc=exc, **k):
            raise exc
        monkeypatch.setattr(pipeline, "run_pipeline", run)
        assert pipeline.main(["--output", str(tmp_path / "p"), "--no-progress"]) == rc
        err = capsys.readouterr().err
        if isinstance(exc, KeyError):
            assert "Traceback" in err
        else:
            assert err.strip().splitlines() == [f"error: {exc}"]


# ----------------------------------------------------------------------------- 7. markers last
def test_evaluation_publish_writes_results_json_last(tmp_path, monkeypatch):
    import rayweights.evaluation.cli as ecli

    src = tmp_path / "report"
    src.mkdir()
    for i in range(12):
        (src / f"curves-{i:02d}.png").write_bytes(b"png")
    (src / "report.md").write_text("r")
    (src / "results.json").write_text("{}")
    order = []
    real = ecli.write_bytes_atomic

    def spy(loc, data):
        order.append(os.path.basename(loc.path))
        if len(order) == 3:
            raise OSError("injected: the storage went away")
        real(loc, data)

    monkeypatch.setattr(ecli, "write_bytes_atomic", spy)
    with pytest.raises(OSError):
        ecli._publish(str(src), str(tmp_path / "out"))
    assert not (tmp_path / "out" / "results.json").exists()          # no "done" marker on a partial folder
    monkeypatch.setattr(ecli, "write_bytes_atomic", lambda loc, data: (order.append(os.path.basename(loc.path)),
                                                                         real(loc, data)))
    order.clear()
    ecli._publish(str(src), str(tmp_path / "out"))
    assert order[-1] == "results.json" and len(order) == 14


class _Res:
    def __init__(self, cfg, metrics, error=None):
        self.config, self.metrics, self.error = cfg, metrics, error


@pytest.mark.s3
def test_sweep_results_go_to_s3(s3_uri):
    from rayweights.storage import exists, read_bytes, resolve
    from rayweights.sweep import load_space, write_results

    space = load_space(ROOT / "tune_spaces" / "block_size.yaml")
    grid = [_Res({"block_size": 128}, {space.metric: 0.5}), _Res({"block_size": 256}, {space.metric: 0.7})]
    df, paths = write_results(space, grid, s3_uri)
    assert all(p.startswith("s3://") for p in paths.values())
    assert all(exists(resolve(p)) for p in paths.values())
    assert b"0.7" in read_bytes(resolve(paths["markdown"]))


# ----------------------------------------------------------------------------- 8. embedded Ray
def test_embedded_ray_ignores_a_stale_ray_current_cluster_file():
    """A dead cluster's address in Ray's ``ray_current_cluster`` file must not be joined: the
    default is an embedded local Ray (a short private temp dir stands in for /tmp/ray)."""
    tmp = tempfile.mkdtemp(prefix="rw", dir="/tmp")
    os.makedirs(os.path.join(tmp, "ray"))                  # Ray's temp dir is $RAY_TMPDIR/ray
    Path(tmp, "ray", "ray_current_cluster").write_text("127.0.0.1:1\n")          # nothing listens there
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=tmp, PYTHONPATH=str(ROOT), RAY_gcs_rpc_server_reconnect_timeout_s="20")
    code = ("import ray; from rayweights.runtime import ray_init; ray_init(); "      # as the jobs call it
            "print('started', ray.get_runtime_context().gcs_address); ray.shutdown()")
    try:
        p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("ray_init waited on the stale cluster address")
    finally:
        subprocess.run(["rm", "-rf", tmp], check=False)
    assert p.returncode == 0 and "started" in p.stdout and "127.0.0.1:1\n" not in p.stdout, p.stderr[-2000:]


# ----------------------------------------------------------------------------- 9. configs are code
def test_module_factory_values_need_allow_import(tmp_path):
    from rayweights.evaluation.cli import EvaluateConfig
    from rayweights.learngene.spec import LearngeneConfig

    with pytest.raises(ConfigError, match="family: .* would import and run code .*allow_import: true"):
        load_config(EvaluateConfig, None, ["family=os:system"])
    with pytest.raises(ConfigError, match="feature_extractor: .* would import"):
        load_config(EvaluateConfig, None, ["feature_extractor=module:os:getcwd"])
    with pytest.raises(ConfigError, match="family_options.feature_extractor: .* would import"):
        load_config(EvaluateConfig, None, ["family_options={feature_extractor: 'module:os:getcwd'}"])
    assert load_config(EvaluateConfig, None, ["family=tests.evalkit:make_adapter", "allow_import=true"]).allow_import
    lg = ROOT / "jobs" / "configs" / "learngene_resnet.yaml"
    with pytest.raises(ConfigError, match="constructor: .* would import"):
        load_config(LearngeneConfig, lg, ["constructor=os:system"])
    assert load_config(LearngeneConfig, lg, ["constructor=os:system", "allow_import=true"]).constructor
