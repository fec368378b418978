"""Generator training on Ray Train V2 + DeepSpeed (CPU, gloo): config and preflight errors, a
two-worker ZeRO-2 run that checkpoints and exports, a run that survives a killed worker (and
verifies the state it restored), resume by run name, the checkpoint restore's fingerprint check,
and the train-generator job's exit codes."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from rayweights.config import ConfigError, from_dict, load_config
from rayweights.generators import load_generator
from rayweights.train import GeneratorTrainConfig, TrainError, preflight, train_generator
from tests.genkit import empty_table, tiny_table

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def zoo_uri(tmp_path_factory):
    return tiny_table(str(tmp_path_factory.mktemp("train") / "zoo"), members=4, checkpoints=2)


def _cfg(zoo, storage, **kw):
    base = dict(method="pdiff", zoo=zoo, storage=str(storage), run_name="r", batch_size=8, lr=3e-3,
                stages={"autoencoder": {"steps": 20}, "diffusion": {"steps": 10}}, num_workers=2,
                cpus_per_worker=0.5, zero_stage=2, precision="fp32", checkpoint_every=10, log_every=5,
                max_failures=0)
    base.update(kw)
    return from_dict(GeneratorTrainConfig, base)


# ----------------------------------------------------------------------------- config
def test_config_is_strict_and_names_the_field(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("method: pdiff\nzoo: x\nbatch_sizee: 3\n")
    with pytest.raises(ConfigError, match="batch_sizee"):
        load_config(GeneratorTrainConfig, str(p), [])
    p.write_text("method: pdiff\nzoo: x\nstages: {vae: {steps: 3}}\n")
    with pytest.raises((ConfigError, ValueError), match="vae"):
        load_config(GeneratorTrainConfig, str(p), [])
    for bad, field in [(dict(method="gan"), "method"), (dict(preset="huge"), "preset"),
                       (dict(zero_stage=4), "zero_stage"), (dict(precision="fp8"), "precision"),
                       (dict(batch_size=9, num_workers=2), "batch_size"), (dict(run_name="a/b"), "run_name"),
                       (dict(model={"unet": {}}), "model")]:
        with pytest.raises(ValueError, match=field):
            GeneratorTrainConfig(**{"method": "pdiff", "zoo": "x", **bad})
    cfg = load_config(GeneratorTrainConfig, "jobs/configs/pdiff_tiny.yaml", ["stages.diffusion.steps=7", "lr=0.5"])
    assert cfg.stages["diffusion"].steps == 7 and cfg.lr == 0.5
    for f in ("denoised_weights_tiny", "d2nwg_tiny", "denoised_weights_cluster"):
        load_config(GeneratorTrainConfig, f"jobs/configs/{f}.yaml", [])


def test_cond_dropout_is_validated_at_load_and_reaches_the_method(tmp_path, zoo_uri):
    p = tmp_path / "c.yaml"
    p.write_text("method: denoised_weights\nzoo: x\ncond_dropout: 1.5\n")
    with pytest.raises(ConfigError, match="cond_dropout: must be in"):
        load_config(GeneratorTrainConfig, str(p), [])
    with pytest.raises(ConfigError, match="cond_dropout: .*unconditional"):
        load_config(GeneratorTrainConfig, "jobs/configs/pdiff_tiny.yaml", ["cond_dropout=0.1"])
    cfg = load_config(GeneratorTrainConfig, "jobs/configs/d2nwg_tiny.yaml", ["cond_dropout=0.2"])
    assert cfg.cond_dropout == 0.2
    plan = preflight(_cfg(zoo_uri, tmp_path, method="d2nwg", stages={}, cond_dropout=0.2))
    assert plan.method.cond_dropout == 0.2 and plan.method.to_state().cond_dropout == 0.2


def test_preflight_refuses_bad_inputs_before_training(tmp_path, zoo_uri):
    with pytest.raises(TrainError, match="zoo"):
        preflight(_cfg(str(tmp_path / "nothing"), tmp_path))
    with pytest.raises(TrainError, match="no members"):
        preflight(_cfg(empty_table(str(tmp_path / "empty")), tmp_path))
    uncond = tiny_table(str(tmp_path / "uncond"), with_conditions=False)
    with pytest.raises(TrainError, match="no conditions"):
        preflight(_cfg(uncond, tmp_path, method="denoised_weights", stages={}))
    with pytest.raises(TrainError, match="batch_size"):
        preflight(_cfg(zoo_uri, tmp_path, batch_size=64))
    # a run name already trained on another layout is refused (block size 8 vs 16)
    other = tiny_table(str(tmp_path / "other"), block_size=8)
    os.makedirs(tmp_path / "r", exist_ok=True)
    (tmp_path / "r" / "layout.json").write_text(preflight(_cfg(other, tmp_path / "o")).method.layout.to_json())
    with pytest.raises(TrainError, match="different layout"):
        preflight(_cfg(zoo_uri, tmp_path))


# ----------------------------------------------------------------------------- training
def _checkpoints(run, stage):
    return sorted(d for d in os.listdir(os.path.join(run, stage)) if d.startswith("checkpoint-"))


def test_zero2_two_workers_train_checkpoint_export_and_resume(ray_local, tmp_path, zoo_uri):
    cfg = _cfg(zoo_uri, tmp_path, run_name="z2")
    res = train_generator(cfg, show_progress=False)
    run = str(tmp_path / "z2")
    for stage, steps in (("autoencoder", 20), ("diffusion", 10)):
        info = res.stages[stage]
        assert info["steps"] == steps and not info["skipped"] and info["world_size"] == 2
        assert info["checkpoints"] == [f"checkpoint-{s:08d}" for s in range(10, steps + 1, 10)]
        ck = os.path.join(run, stage, info["checkpoints"][-1])
        files = os.listdir(os.path.join(ck, f"step{steps:08d}"))
        # both ranks' ZeRO-2 optimiser partitions landed in the one merged checkpoint
        assert {f for f in files if "optim_states" in f} == {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
                                                           for r in (0, 1)}
        assert json.load(open(os.path.join(ck, "rayweights_checkpoint.json")))["world_size"] == 2
    log = [json.loads(line) for line in open(os.path.join(run, "train_log.jsonl"))]
    ae = [r["loss"] for r in log if r.get("stage") == "autoencoder" and "loss" in r]
    assert len(ae) == 4 and ae[-1] < ae[0]
    # every report says where its steps' time went, and the phases account for the interval's wall time
    reports = [r for r in log if r.get("stage") == "autoencoder" and "step" in r]
    for prev, r in zip(reports, reports[1:]):
        ms = [r[f"ms_{k}"] for k in ("data", "prepare", "forward", "backward", "step", "report")]
        steps = r["step"] - prev["step"]
        interval_ms = 1e3 * steps * cfg.batch_size / r["samples_per_s"]
        assert min(ms) >= 0 and 0.7 * interval_ms <= sum(ms) * steps <= 1.05 * interval_ms, (r, interval_ms)
    gen = load_generator(res.export_uri)
    assert gen.latent_scale and gen.latent_scale > 0
    x = gen.sample(None, 2, mode="ddim", steps=4, seed=0)
    assert x.shape == (2, gen.layout.num_blocks, gen.layout.block_size) and torch.isfinite(x).all()
    # same run name again: every stage is finished, nothing retrains, the export is rewritten identically
    again = train_generator(cfg, show_progress=False)
    assert all(s["skipped"] for s in again.stages.values())
    y = load_generator(again.export_uri).sample(None, 2, mode="ddim", steps=4, seed=0)
    assert torch.equal(x, y)


def test_a_killed_worker_is_restarted_from_the_latest_checkpoint(ray_local, tmp_path, zoo_uri):
    cfg = _cfg(zoo_uri, tmp_path, run_name="ft", only_stages=["autoencoder"], max_failures=1,
               fault_injection={"step": 15, "rank": 1, "mode": "exit"})
    with pytest.raises(TrainError, match="only_stages"):       # diffusion was not selected nor trained
        train_generator(cfg, show_progress=False)
    run = str(tmp_path / "ft")
    assert os.path.exists(os.path.join(run, "autoencoder", "fault-injected-step15"))
    assert _checkpoints(run, "autoencoder") == ["checkpoint-00000010", "checkpoint-00000020"]
    assert os.path.exists(os.path.join(run, "stages", "autoencoder", "done.json"))
    log = [json.loads(line) for line in open(os.path.join(run, "train_log.jsonl"))]
    # the killed attempt's reports (5, 10), its failure, then the restarted attempt's (15, 20), each once
    seq = ["failure" if r.get("event") == "worker_failure" else r["step"] for r in log
           if r.get("event") == "worker_failure" or r.get("stage") == "autoencoder"]
    assert seq == [5, 10, "failure", 15, 20], seq            # resumed after step 10, not from scratch
    first = log[3]
    # the first report after the restart: every rank verified the model and optimiser state it loaded
    # against the fingerprints saved with checkpoint 10 (a mismatch fails the worker)
    assert first["restored_step"] == 10 and first["restored_world_size"] == 2 and first["restored_fingerprint"] is True
    assert not any("restored_step" in r for r in log[:3] + log[4:])
    meta = json.load(open(os.path.join(run, "autoencoder", "checkpoint-00000010", "rayweights_checkpoint.json")))
    assert len(meta["fingerprints"]) == 2 and all(len(f) == 64 for f in meta["fingerprints"])
    # without retries the same failure ends the run with an error naming the stage; the log keeps the
    # reports the stage made before it failed
    bad = _cfg(zoo_uri, tmp_path, run_name="ft0", only_stages=["autoencoder"], max_failures=0,
               fault_injection={"step": 7, "rank": 0, "mode": "raise"})
    with pytest.raises(TrainError, match="stage autoencoder"):
        train_generator(bad, show_progress=False)
    log0 = [json.loads(line) for line in open(os.path.join(tmp_path, "ft0", "train_log.jsonl"))]
    assert [r["step"] for r in log0 if "step" in r] == [5]
    assert any(r.get("event") == "worker_failure" for r in log0)


def test_train_generator_job_exit_codes(ray_local, tmp_path, zoo_uri, capsys):
    from rayweights.train.cli import main

    assert main(["--config", "jobs/configs/pdiff_tiny.yaml", "--set", f"zoo={tmp_path}/missing"]) == 2
    assert "zoo" in capsys.readouterr().err
    assert main(["--config", "jobs/configs/pdiff_tiny.yaml", "--set", "bogus=1"]) == 2
    assert "bogus" in capsys.readouterr().err
    # Denoised Weights end to end with the packaged text encoder: one worker, ZeRO-1
    rc = main(["--config", "jobs/configs/denoised_weights_tiny.yaml", "--no-progress", "--output", str(tmp_path),
               "--set", f"zoo={zoo_uri}", "--set", "steps=6", "--set", "checkpoint_every=3", "--set", "num_workers=1",
               "--set", "zero_stage=1", "--set", "batch_size=16"])
    assert rc == 0, capsys.readouterr().err
    gen = load_generator(str(tmp_path / "denoised-weights-tiny" / "export"))
    assert gen.conditions is not None and len(gen.conditions) == 3
    # the recipe conditions on the prompts' tokens: the cache the workers gathered from holds them
    assert gen.uses_tokens and gen.conditions.has_tokens and gen.conditions.token_dim == 384
    x = gen.sample(["an unseen concept"], 1, mode="one_step", t=500)
    assert x.shape[1:] == (gen.layout.num_blocks, gen.layout.block_size)


@pytest.mark.long                  # ~4-5 min on 2 cores: a `ray start --head` cluster and two Ray Train stages
def test_train_generator_through_ray_job_submit(ray_head_cluster, tmp_path, zoo_uri):
    """`ray job submit -- python jobs/train_generator.py ...` against a running `ray start --head`."""
    job = ray_head_cluster.submit([
        sys.executable, "jobs/train_generator.py", "--config", "jobs/configs/pdiff_tiny.yaml", "--no-progress",
        "--output", str(tmp_path), "--set", f"zoo={zoo_uri}", "--set", "num_workers=1", "--set", "zero_stage=1",
        "--set", "batch_size=4", "--set", "stages={autoencoder: {steps: 4}, diffusion: {steps: 4}}",
        "--set", "checkpoint_every=4"])
    assert job.returncode == 0, (job.stdout[-3000:], job.stderr[-3000:])
    gen = load_generator(str(tmp_path / "pdiff-tiny" / "export"))
    assert gen.sample(None, 2).shape[0] == 2


@pytest.mark.slow
@pytest.mark.long                                                                  # ~7 min on 2 cores
@pytest.mark.timeout(900)
@pytest.mark.parametrize("zero_stage,workers", [(2, 2)], ids=["zero2-2workers"])
def test_d2nwg_trains_every_stage_with_each_zero_stage(ray_local, tmp_path, zoo_uri, zero_stage, workers):
    """D2NWG's three stages through train_generator on two workers under ZeRO-2 (the Set Transformer's
    contrastive temperature is a parameter DeepSpeed broadcasts and partitions). Every ZeRO stage 0-3 on
    one rank, with the worker's own DeepSpeed config, and ZeRO-3 on two ranks of a torch.distributed
    group like Ray Train's, are the tests below."""
    cfg = _cfg(zoo_uri, tmp_path, method="d2nwg", run_name=f"d2-z{zero_stage}-w{workers}", zero_stage=zero_stage,
               num_workers=workers, batch_size=8, checkpoint_every=3, log_every=1, dataset_samples_per_class=3,
               stages={"vae": {"steps": 3}, "dataset_encoder": {"steps": 3}, "diffusion": {"steps": 3}})
    res = train_generator(cfg, show_progress=False)
    for stage in ("vae", "dataset_encoder", "diffusion"):
        assert res.stages[stage]["steps"] == 3 and res.stages[stage]["world_size"] == workers
    gen = load_generator(res.export_uri)
    enc = gen.model("dataset_encoder")
    assert enc.logit_scale.shape == (1,) and torch.isfinite(enc.logit_scale).all()
    assert gen.latent_scale and gen.conditions is not None and len(gen.conditions) == 3
    x = gen.sample(["digits:0,1,2", "digits:1,5,9"], 2, mode="ddim", steps=3, seed=0)
    assert x.shape == (4, gen.layout.num_blocks, gen.layout.block_size) and torch.isfinite(x).all()


@pytest.fixture(scope="module")
def one_rank_process_group():
    """A one-rank gloo process group in this process (what a Ray Train worker has), for DeepSpeed."""
    import socket

    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                     "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
            os.environ.setdefault(k, v)
        deepspeed.init_distributed(dist_backend="gloo")
    yield


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_d2nwg_stage_modules_initialize_and_step_under_each_zero_stage(one_rank_process_group, tmp_path, zoo_uri,
                                                                       zero_stage):
    """The worker's deepspeed.initialize on every D2NWG stage module (no Ray): DeepSpeed broadcasts
    and flattens every parameter through ``p.data.view(torch.uint8)``, which a 0-dim parameter (the
    Set Transformer's contrastive temperature) cannot do."""
    import dataclasses

    import deepspeed

    from rayweights.train.config import resolved_stage
    from rayweights.train.trainer import finish_stage
    from rayweights.train.worker import deepspeed_config, gather_fp32_state_dict

    cfg = _cfg(zoo_uri, tmp_path, method="d2nwg", zero_stage=zero_stage, num_workers=1, batch_size=8,
               dataset_samples_per_class=3, stages={"vae": {"steps": 2}, "dataset_encoder": {"steps": 2},
                                                    "diffusion": {"steps": 2}})
    plan = preflight(cfg)
    method, zoo = plan.method, plan.zoo
    flat = zoo.blocks().flatten(1)
    names = method.condition_names
    cond = torch.tensor([names.index(c) for r in zoo.members.to_pylist() for c in [r["condition"]] * 2])
    for stage in method.stages:
        sc = resolved_stage(cfg, stage)
        ds_cfg = deepspeed_config(sc, dataclasses.asdict(cfg), 1, False)
        ds_cfg["zero_optimization"]["stage"] = zero_stage   # the worker runs ZeRO-0 for 1/2 on one rank; not here
        if zero_stage == 3:
            with deepspeed.zero.Init(config_dict_or_path=ds_cfg):
                module = method.trainer_module(stage)
        else:
            module = method.trainer_module(stage)
        engine, _, _, _ = deepspeed.initialize(model=module, config=ds_cfg,
                                               model_parameters=[p for p in module.parameters() if p.requires_grad])
        for step in range(2):
            idx = torch.arange(8) + 8 * step
            loss = engine(**method.prepare(stage, {"weights": flat[idx], "cond_id": cond[idx]}))
            engine.backward(loss)
            engine.step()
            assert torch.isfinite(loss)
        key = method.stage_model[stage]              # the worker's export of a (possibly partitioned) model
        sd = gather_fp32_state_dict(engine, method.model(key))
        model = type(method.model(key)).from_config(method.model(key).config)
        model.load_state_dict(sd)
        method.models[key] = model
        finish_stage(method, stage, flat)
    assert method.model("dataset_encoder").logit_scale.shape == (1,)


def _two_rank_zero3(rank: int, port: int, cfg, stages_seen):
    """One rank of a two-rank gloo group made with torch.distributed only, as Ray Train's torch
    backend makes it (deepspeed.comm is not initialised), building every D2NWG stage's engine."""
    import dataclasses

    import torch.distributed as dist

    from rayweights.train.config import resolved_stage
    from rayweights.train.trainer import finish_stage
    from rayweights.train.worker import build_engine, deepspeed_config

    torch.set_num_threads(1)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", rank=rank, world_size=2)
    plan = preflight(cfg)
    method = plan.method
    flat = plan.zoo.blocks().flatten(1)
    names = method.condition_names
    cond = torch.tensor([names.index(r["condition"]) for r in plan.zoo.members.to_pylist() for _ in range(2)])
    for stage in method.stages:
        ds_cfg = deepspeed_config(resolved_stage(cfg, stage), dataclasses.asdict(cfg), 2, False)
        assert ds_cfg["zero_optimization"]["stage"] == 3
        engine, _ = build_engine(method, stage, ds_cfg)
        idx = torch.arange(4) + 4 * rank                  # this rank's micro-batch of 4 (global batch 8)
        loss = engine(**method.prepare(stage, {"weights": flat[idx], "cond_id": cond[idx]}))
        engine.backward(loss)
        engine.step()
        assert torch.isfinite(loss)
        stages_seen[rank].append(stage)
        key = method.stage_model[stage]      # the next stage needs this one unpartitioned (values do not matter here)
        method.models[key] = type(method.model(key)).from_config(method.model(key).config)
        finish_stage(method, stage, flat)
    dist.destroy_process_group()


def test_zero3_on_two_ranks_builds_and_steps_every_d2nwg_stage(tmp_path, zoo_uri):
    """ZeRO-3 on two workers: deepspeed.zero.Init once read a world size of 1 when deepspeed.comm was
    not attached to the group Ray Train had made, and failed DeepSpeed's batch check (8 != 4 x 1 x 1)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = _cfg(zoo_uri, tmp_path, method="d2nwg", zero_stage=3, num_workers=2, batch_size=8,
               dataset_samples_per_class=3, stages={"vae": {"steps": 1}, "dataset_encoder": {"steps": 1},
                                                    "diffusion": {"steps": 1}})
    manager = mp.Manager()
    lists = {r: manager.list() for r in (0, 1)}
    mp.spawn(_two_rank_zero3, args=(port, cfg, lists), nprocs=2, join=True)
    assert [list(lists[r]) for r in (0, 1)] == [["vae", "dataset_encoder", "diffusion"]] * 2


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_a_restore_is_verified_against_the_saved_state_fingerprint(one_rank_process_group, tmp_path, zoo_uri,
                                                                   zero_stage, monkeypatch):
    """The worker's checkpoint write and restore (no Ray): a fresh engine restored from a checkpoint holds
    exactly the saved model and optimiser state (its fingerprint equals the saved one); a checkpoint whose
    files were changed after the save, or a load that leaves the fresh state, fails naming stage, step, rank."""
    import dataclasses
    import shutil

    from rayweights.train.config import resolved_stage
    from rayweights.train.worker import (CKPT_META, _deepspeed_safe_globals, _tensors, build_engine, deepspeed_config,
                                         restore_checkpoint, state_fingerprint, write_checkpoint)

    cfg = _cfg(zoo_uri, tmp_path, zero_stage=zero_stage, num_workers=1, batch_size=8)
    plan = preflight(cfg)
    stage = "autoencoder"
    ds_cfg = deepspeed_config(resolved_stage(cfg, stage), dataclasses.asdict(cfg), 1, False)
    ds_cfg["zero_optimization"]["stage"] = zero_stage     # the worker runs ZeRO-0 for 1/2 on one rank; not here
    flat = plan.zoo.blocks().flatten(1)

    def engine_of(seed):
        torch.manual_seed(seed)
        method = plan.method.from_state(plan.method.to_state())
        return build_engine(method, stage, ds_cfg)[0], method

    engine, method = engine_of(0)
    for step in range(3):
        loss = engine(**method.prepare(stage, {"weights": flat[torch.arange(8) + step]}))
        engine.backward(loss)
        engine.step()
    ck = str(tmp_path / "ck")
    meta = {"step": 3, "stage": stage, "tag": "step00000003", "world_size": 1, "zero_stage": zero_stage}
    [saved] = write_checkpoint(engine, ck, meta, 0, 1)
    assert json.load(open(os.path.join(ck, CKPT_META)))["fingerprints"] == [saved]

    fresh, _ = engine_of(1)
    assert state_fingerprint(fresh.module, fresh.optimizer) != saved
    step, info = restore_checkpoint(fresh, ck, stage, 1, 0, zero_stage)
    assert step == 3 and info == {"restored_step": 3, "restored_world_size": 1, "restored_fingerprint": True}
    assert state_fingerprint(fresh.module, fresh.optimizer) == saved

    # the saved optimiser state changed after the save: loaded as it is, it is not the saved state
    bad = str(tmp_path / "bad")
    shutil.copytree(ck, bad)
    moments: list = []
    for f in sorted(os.listdir(os.path.join(bad, "step00000003"))):      # ZeRO-0: model_states; else optim_states
        path = os.path.join(bad, "step00000003", f)
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):      # as the engine loads it
            sd = torch.load(path, weights_only=True)
        moments = [t for name, t in _tensors(sd) if name.endswith("/exp_avg")]
        if moments:
            moments[0].view(-1)[0] += 1.0
            torch.save(sd, path)
            break
    assert moments
    with pytest.raises(RuntimeError, match=f"stage {stage}: the state restored .* \\(step 3\\) on rank 0 is not"):
        restore_checkpoint(engine_of(2)[0], bad, stage, 1, 0, zero_stage)
    # a load that leaves the fresh state (nothing restored) is caught too
    fresh3, _ = engine_of(3)
    monkeypatch.setattr(fresh3, "load_checkpoint", lambda d, tag=None, **kw: (d, {}))
    with pytest.raises(RuntimeError, match="step 3.*rank 0.*not the state saved"):
        restore_checkpoint(fresh3, ck, stage, 1, 0, zero_stage)
    # a checkpoint of another world size loads the model only: said so, nothing to verify
    if zero_stage < 3:
        m = json.load(open(os.path.join(ck, CKPT_META)))
        with open(os.path.join(ck, CKPT_META), "w") as f:
            json.dump({**m, "world_size": 2}, f)
        _, info = restore_checkpoint(engine_of(4)[0], ck, stage, 1, 0, zero_stage)
        assert info == {"restored_step": 3, "restored_world_size": 2, "restored_fingerprint": False}
