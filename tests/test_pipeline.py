"""The one-command pipeline (zoo -> generator -> evaluation) and the Tune sweeps that run it per trial."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pytest
import torch

from rayweights.config import ConfigError
from rayweights.pipeline import PipelineConfig, check_stages, load_pipeline_config, main, run_pipeline
from rayweights.sweep import load_space

ROOT = Path(__file__).resolve().parents[1]
SPACES = sorted((ROOT / "tune_spaces").glob("*.yaml"))

# A smaller setting than the default: 2 partial-family tasks x 2 members (4 kept steps each), one
# held-out task, a few generator steps, 2 samples and 1 fine-tuning epoch.  block_size 32 (the
# spec's is 16) makes the pipeline re-tokenise the built zoo.
SMALL_ZOO = ["max_tasks=2", "members_per_task=2", "keep_last=4", "base_epochs=2", "hparams.epochs=[1, 1]",
             'held_out=["digits:0,1,2,5,6"]', "resources.num_cpus=0.5", "resources.workers=2"]
SMALL_TRAIN = ["batch_size=8", "stages.autoencoder.steps=4", "stages.diffusion.steps=4", "checkpoint_every=4",
               "log_every=2", "cpus_per_worker=0.5"]
SMALL_EVAL = ["t=100", "cpus_per_task=0.5", "max_zoo_members=8", "iou_members=4"]


def _small(tmp: Path, **kw) -> PipelineConfig:
    return PipelineConfig(output=str(tmp / "out"), cache=str(tmp / "cache"), zoo_set=list(SMALL_ZOO),
                          train_set=list(SMALL_TRAIN), eval_set=list(SMALL_EVAL), num_samples=2, epochs=1,
                          block_size=32, **kw)


# ----------------------------------------------------------------------------- configs (fast)
@pytest.mark.parametrize("overrides, field", [
    (["epochs=0"], "epochs"),
    (["num_samples=0"], "num_samples"),
    (["zoo_sett=[]"], "unknown key"),
    (["lr=-1"], "lr"),
    (["block_size=0"], "block_size"),
    (["max_timestep=50", "one_step_t=60"], "one_step_t"),
    (["rounds=0"], "rounds"),
    (["train_set=batch_size=16"], "train_set"),
])
def test_bad_pipeline_config_names_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        load_pipeline_config(None, overrides)


def test_bad_stage_settings_are_refused_before_any_work(tmp_path, capsys):
    cases = [
        (["generator=jobs/configs/nope.yaml"], "generator/train_set: config file not found"),
        (['train_set=["batch_sise=8"]'], "generator/train_set: .*unknown key.*batch_sise"),
        (['zoo_set=["architecture=vgg99"]'], "zoo_spec/zoo_set: .*architecture"),
        (['eval_set=["method=euler"]'], "eval_set: .*method"),
        (["rule=9"], "rule: unknown grouping rule 9"),
        (["max_timestep=50"], r"eval_set \(t\): one-step t=100 is outside \[0, max_timestep=50\)"),
        (["generator=jobs/configs/denoised_weights_tiny.yaml", "train_set=[]", "input_noise=0.01"], "input_noise: .*p-diff"),
        (["generator=jobs/configs/d2nwg_tiny.yaml"], "generator/train_set: .*autoencoder"),   # p-diff's defaults
    ]
    for overrides, msg in cases:
        with pytest.raises(ConfigError, match=msg):
            check_stages(load_pipeline_config(None, overrides))
    # the job: exit code 2 and one line naming the field, nothing written
    out = tmp_path / "never"
    assert main(["--set", "epochs=0", "--output", str(out)]) == 2
    assert "epochs" in capsys.readouterr().err
    assert main(["--set", "lr=0.001", "--set", 'train_set=["stages.vae.steps=3"]', "--output", str(out)]) == 2
    assert "stages" in capsys.readouterr().err
    assert not out.exists()


def test_trial_knobs_reach_the_stage_configs():
    cfg = load_pipeline_config(None, ["input_noise=0.02", "latent_noise=0.3", "max_timestep=500", "lr=0.004",
                                      "one_step_t=20", "block_size=64", "rule=3"])
    spec, bs, rule, tcfg, ecfg = check_stages(cfg)
    assert (bs, rule) == (64, 3) and (spec.block_size, spec.rule) == (16, 1)     # re-tokenised later, not rebuilt
    assert tcfg.model["autoencoder"] == {"input_noise": 0.02, "latent_noise": 0.3}
    # as Tune writes them (json.dumps): 1e-05 is a float for the model config too, not YAML's string
    tiny = check_stages(load_pipeline_config(None, [f"input_noise={json.dumps(1e-05)}", f"lr={json.dumps(2e-05)}"]))[3]
    assert tiny.model["autoencoder"]["input_noise"] == 1e-05 and tiny.lr == 2e-05
    assert tcfg.scheduler.num_train_timesteps == 500 and tcfg.lr == 0.004
    assert (ecfg.method, ecfg.t) == ("one_step", 20)
    d2 = load_pipeline_config(None, ["generator=jobs/configs/d2nwg_tiny.yaml", "train_set=[]", "lr=0.005"])
    t2 = check_stages(d2)[3]
    assert t2.lr == 0.005 and all(s.lr in (None, 0.005) for s in t2.stages.values())   # per-stage lrs too


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.stem)
def test_every_tune_space_key_is_a_pipeline_key(path):
    import dataclasses

    space = load_space(path)
    fields = {f.name for f in dataclasses.fields(PipelineConfig)}
    assert set(space.space) | set(space.fixed) <= fields
    base = load_pipeline_config(space.base_config)
    assert Path(space.base_config).name in ("sweep_base.yaml", "sweep_denoised_weights.yaml")
    # one value of each distribution, applied as the trial would, passes every stage's checks
    over = []
    for key, dist in space.space.items():
        kind, arg = next(iter(dist.items()))
        v = arg[0] if kind in ("grid_search", "choice", "uniform", "loguniform", "randint", "quniform") else arg
        over.append(f"{key}={json.dumps(v)}")
    over += [f"{k}={json.dumps(v)}" for k, v in space.fixed.items()]
    cfg = load_pipeline_config(space.base_config, over)
    check_stages(cfg)
    assert base.train_set and any(s.startswith("cpus_per_worker=") for s in base.train_set)
    # feasible on the 2-CPU embedded Ray: a trial + its train workers leave a CPU for Ray Data
    assert space.resources_per_trial.cpu <= 0.5 and space.max_concurrent_trials == 1


# ----------------------------------------------------------------------------- end to end (slow)
# One small sweep (2 trials over one_step_t) runs first, in a module fixture: its first trial builds
# the zoo and trains the generator inside a Tune trial (Ray Data + Ray Train beside the trial), the
# second trial reuses both.  The end-to-end test then runs the pipeline outside Tune on the same
# cache: it reuses zoo and generator and evaluates with its own sampling settings.
FIXED = {"zoo_set": SMALL_ZOO, "train_set": SMALL_TRAIN, "eval_set": SMALL_EVAL, "num_samples": 2, "epochs": 1,
         "block_size": 32, "lr": 0.002}


@pytest.fixture(scope="module")
def sweep_run(ray_local, tmp_path_factory):
    from rayweights.sweep import run_sweep

    tmp = tmp_path_factory.mktemp("pipeline")
    space = load_space(ROOT / "tune_spaces" / "diffusion.yaml", [
        "name=t_pair", "num_samples=1", "scheduler={type: fifo}", "space={one_step_t: {grid_search: [5, 50]}}",
        f"fixed={json.dumps({**FIXED, 'cache': str(tmp / 'cache')})}"])
    out = tmp / "sweeps"
    t0 = time.perf_counter()
    df, paths = run_sweep(space, str(out), resume=True)
    return tmp, space, out, df, paths, time.perf_counter() - t0


@pytest.mark.slow
def test_two_trial_sweep_writes_its_table_and_resumes(sweep_run):
    from rayweights.sweep import run_sweep

    tmp, space, out, df, paths, seconds = sweep_run
    assert len(df) == 2 and set(df["one_step_t"]) == {5, 50} and (df["status"] == "ok").all()
    assert df["gen_accuracy"].between(0, 1).all() and (df["num_blocks"] >= 1).all()
    for k in ("markdown", "csv", "plot"):
        assert Path(paths[k]).is_file()
    md = Path(paths["markdown"]).read_text()
    assert "one_step_t" in md and "gen_accuracy" in md and md.count("| ok ") == 2
    trials = sorted(p for p in (out / "trials").iterdir() if (p / "metrics.json").is_file())
    assert len(trials) == 2
    assert len(list((tmp / "cache").glob("gen-*"))) == 1          # both trials used one generator
    metrics = [json.loads((p / "metrics.json").read_text()) for p in trials]
    assert len({m["report"] for m in metrics}) == 2 and all(Path(m["report"]).is_file() for m in metrics)
    mtimes = {p: os.path.getmtime(p / "metrics.json") for p in trials}
    # a second call restores the finished experiment: nothing re-runs, the table is written again
    os.remove(paths["markdown"])
    t0 = time.perf_counter()
    df2, paths2 = run_sweep(space, str(out), resume=True)
    assert time.perf_counter() - t0 < seconds / 2
    assert len(df2) == 2 and (df2["status"] == "ok").all() and Path(paths2["markdown"]).is_file()
    assert {p: os.path.getmtime(p / "metrics.json") for p in trials} == mtimes
    assert sorted(df2["gen_accuracy"]) == pytest.approx(sorted(df["gen_accuracy"]))


@pytest.mark.slow
def test_pipeline_end_to_end_writes_report_plots_and_metrics(sweep_run, capsys):
    from rayweights.table import open_zoo

    tmp = sweep_run[0]
    cfg = _small(tmp, lr=0.002)
    result = run_pipeline(cfg, show_progress=False, print_table=False)
    assert Path(result.report).is_file() and "(a) generated" in Path(result.report).read_text()
    assert result.plots and all(Path(p).is_file() and p.endswith(".png") for p in result.plots)
    assert any("digits-01256" in p for p in result.plots)
    m = result.metrics
    assert m["metric"] == "accuracy" and 0.0 <= m["gen_accuracy"] <= 1.0 and m["num_tasks"] == 1
    assert 0.0 <= m["random_accuracy_epoch0"] <= 1.0 and m["gen_loss"] == m["gen_loss"]
    assert m["num_blocks"] >= 1 and m["block_size"] == 32 and m["sample_seconds"] >= 0
    assert "| (a) generated |" in result.table and "| (b) random |" in result.table
    summary = json.loads((tmp / "out" / "summary.json").read_text())
    assert summary["metrics"]["gen_accuracy"] == pytest.approx(m["gen_accuracy"])
    assert (tmp / "out" / "summary.md").read_text().count("(a) generated") == 1
    assert len(list((tmp / "cache").glob("gen-*"))) == 1            # the sweep's generator, reused
    # block_size 32 != the spec's 16: the built zoo was re-tokenised, same members, same weights
    src = open_zoo(next(str(p) for p in (tmp / "cache").glob("zoo-*") if "-b" not in p.name))
    dst = open_zoo(result.zoo)
    assert (src.layout.block_size, dst.layout.block_size) == (16, 32) and len(src) == len(dst) == 4
    mid = sorted(src.members.column("member_id").to_pylist())[0]
    for (s1, a), (s2, b) in zip(src.state_dicts(mid), dst.state_dicts(mid)):
        assert s1 == s2 and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((Path(result.zoo) / "zoo_spec.json").read_text())["spec"]["block_size"] == 32
    # re-running reuses every finished stage (the evaluation too) and prints the table
    report_mtime = os.path.getmtime(result.report)
    again = run_pipeline(cfg, show_progress=False, print_table=True)
    assert again.report == result.report and os.path.getmtime(result.report) == report_mtime
    assert again.metrics["gen_accuracy"] == pytest.approx(m["gen_accuracy"])
    out = capsys.readouterr().out
    assert "| (a) generated |" in out and f"report: {result.report}" in out


# ----------------------------------------------------------------------------- Denoised Weights, whole path
# The shipped Denoised Weights pipeline config on a tiny concepts zoo: 4 training concepts + the held-out
# every-4th one, a base generator and LoRA members, BlockUNet1D under Ray Train (2 workers, ZeRO-2) with the
# packaged MiniLM's token states, one-step samples for the held-out concept, one fine-tuning epoch of every
# initialisation scored by FID/KID with the extractor trained beside the zoo.
DW_ZOO = ["max_tasks=4", "concepts.max_ops=1", "concepts.paraphrases=1", "held_out=[]", "held_out_every=4",
          "init=shared", "arch_options={width: 4, res_blocks: 1, heads: 2}", "concepts.num_images=24",
          "concepts.base_images=32", "base_epochs=2", "hparams.epochs=[3, 3]", "keep_last=2", "batch_size=8",
          "concepts.discriminator={width: 8, layers: 2}", "resources.num_cpus=0.5", "resources.workers=2"]
DW_TRAIN = ["normalization=element", "steps=30", "checkpoint_every=30", "log_every=10", "batch_size=32",
            "cpus_per_worker=0.5"]
DW_EVAL = ["method=one_step", "t=500", "family_options={metric: fid, fid_images: 64}", "cpus_per_task=0.5",
           "max_zoo_members=8"]


@pytest.mark.slow
def test_denoised_weights_pipeline_end_to_end(ray_local, tmp_path):
    from rayweights.generators import load_generator
    from rayweights.zoo import plan_tasks

    cfg = load_pipeline_config(str(ROOT / "jobs" / "configs" / "pipeline_denoised_weights.yaml"), [
        f"output={tmp_path / 'out'}", f"zoo_set={json.dumps(DW_ZOO)}", f"train_set={json.dumps(DW_TRAIN)}",
        f"eval_set={json.dumps(DW_EVAL)}", "num_samples=2", "epochs=1"])
    st = check_stages(cfg)
    assert (st.train.method, st.train.num_workers, st.train.zero_stage) == ("denoised_weights", 2, 2)
    result = run_pipeline(cfg, show_progress=False, print_table=False)
    m = result.metrics
    assert m["metric"] == "fid" and m["num_tasks"] == 1 and math.isfinite(m["gen_fid"]) and m["gen_fid"] >= 0
    report = Path(result.report).read_text()
    # every initialisation of the paper's comparison, FID with its image counts and the extractor named
    for label in ("(a) generated", "(b) random", "(c) pretrained", "(d) best-of-N", "(e) nearest zoo ckpt",
                  "(f) zoo soup"):
        assert label in report
    assert "Metric: **fid**" in report and "kid (n=64/64) epoch 0" in report
    assert "extractor `trained:" in report and "64 generated vs 64 target images" in report
    assert (Path(result.zoo) / "extractor" / "config.json").is_file()
    results = json.loads((Path(result.evaluation) / "results.json").read_text())
    (task,) = results["tasks"]
    held = [t.condition for t in plan_tasks(st.spec)[1]]
    assert task["condition"] == held[0] and len(held) == 1 and task["curves"]
    # the export: the prompt's tokens reach the denoiser; two prompts give different weights (same noise)
    gen = load_generator(result.generator)
    assert gen.model_configs["denoiser"]["condition_mode"] == "tokens"
    a, b = (gen.sample([p], 2, mode="one_step", t=500, seed=0) for p in (held[0], "make it brighter"))
    same = gen.sample([held[0]], 2, mode="one_step", t=500, seed=0)
    assert torch.equal(a, same) and float((a - b).abs().mean()) > 1e-4 * float(a.abs().mean())
