import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from rayweights.config import load_config
from rayweights.table import open_zoo
from rayweights.zoo import ZooSpec, build_zoo, plan_tasks
from rayweights.zoo.cli import main as build_main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "jobs" / "specs" / "tiny.yaml"
FAST = ["max_tasks=3", "members_per_task=2", "hparams.epochs=[4,5]", "keep_last=2"]


def spec(output, *extra):
    return load_config(ZooSpec, TINY, [*FAST, f"output={output}", *extra])


def check_zoo(uri, n_members):
    zoo = open_zoo(uri)
    assert len(zoo) == n_members
    assert len(set(zoo.members.column("member_id").to_pylist())) == n_members   # no duplicates
    for m in zoo.members.column("metrics").to_pylist():
        metrics = json.loads(m)
        assert len(metrics) == 2
        assert metrics[-1]["val_acc"] > 0.5   # chance on a 5-class task is 0.2
    # the kept weights reassemble and load into the architecture
    from rayweights.zoo.families import template_state_dict
    sd = dict(template_state_dict(spec("x"), 5))
    step, weights = zoo.state_dicts(zoo.members.column("member_id")[0].as_py())[-1]
    sd.update(weights)
    from rayweights.zoo import architectures
    model = architectures.build("mlp3", (1, 8, 8), 5, hidden=16)
    model.load_state_dict(sd)
    return zoo


def test_held_out_tasks_are_reserved():
    train, held = plan_tasks(load_config(ZooSpec, TINY))
    assert {t.condition for t in held} == {"digits:0,1,2,5,6", "digits:3,4,7,8,9"}
    assert not {t.condition for t in train} & {t.condition for t in held}
    full = load_config(ZooSpec, ROOT / "jobs/specs/digits_subsets_full.yaml")
    tr, ho = plan_tasks(full)
    assert len(tr) + len(ho) == 252 and len(ho) == 25


def test_build_local_resume_and_failures(tmp_path, ray_local):
    uri = str(tmp_path / "zoo")
    s = spec(uri)
    first = build_zoo(s)
    assert (first.done, first.skipped, first.failed) == (6, 0, 0)
    zoo = check_zoo(uri, 6)
    # hyper-parameters differ between members (a diverse zoo, not one run's checkpoints)
    lrs = {json.loads(h)["lr"] for h in zoo.members.column("hparams").to_pylist()}
    assert len(lrs) == 6
    # resume: delete two members (one entry, one blocks file) -> exactly those are redone
    victims = zoo.members.column("member_id").to_pylist()[:2]
    os.remove(tmp_path / "zoo" / "members" / f"{victims[0]}.json")
    os.remove(tmp_path / "zoo" / zoo.file_of(victims[1]))
    again = build_zoo(s)
    assert (again.done, again.skipped, again.failed) == (2, 4, 0)
    check_zoo(uri, 6)
    # a member that keeps failing is recorded with its error, never half visible; a transient
    # failure (first attempt only) is retried and succeeds
    shutil.rmtree(tmp_path / "zoo")
    bad = spec(uri, "fail_members=[digits-01234-s1, digits-01235-s0:1]", "max_retries=1")
    res = build_zoo(bad)
    assert res.failed == 1 and res.done == 5
    assert res.failures[0][0] == "digits-01234-s1" and "injected failure" in res.failures[0][1]
    zoo = open_zoo(uri)
    assert "digits-01234-s1" not in zoo.members.column("member_id").to_pylist()
    f = zoo.failures.to_pylist()
    assert f[0]["member_id"] == "digits-01234-s1" and "injected failure" in f[0]["error"] and f[0]["attempts"] == 2
    assert "Traceback" in f[0]["error"]
    retried = {r["member_id"]: json.loads(r["hparams"]) for r in zoo.members.to_pylist()}["digits-01235-s0"]
    assert retried["attempts"] == 2
    # rerunning after the fault is gone redoes exactly the failed member; its failure record goes
    fixed = build_zoo(spec(uri))
    assert (fixed.done, fixed.skipped, fixed.failed) == (1, 5, 0)
    assert len(open_zoo(uri).failures) == 0


@pytest.mark.s3
def test_build_to_s3(s3_uri, ray_local):
    res = build_zoo(spec(s3_uri, "max_tasks=2", "members_per_task=1"))
    assert res.done == 2 and res.failed == 0
    check_zoo(s3_uri, 2)
    # an output bucket that does not exist fails before training, naming the output
    bucket = s3_uri.split("/")[2]
    assert build_main(["--config", str(TINY), "--output", s3_uri.replace(bucket, bucket + "-missing")]) == 2


def test_bad_input_fails_before_training(tmp_path, capsys):
    out = str(tmp_path / "z")
    assert build_main(["--config", str(TINY), "--output", out, "--set", "family=weird"]) == 2
    assert "family" in capsys.readouterr().err
    assert build_main(["--config", str(TINY), "--output", out, "--set", "architecture=vit9000"]) == 2
    assert "architecture" in capsys.readouterr().err
    assert build_main(["--config", str(TINY), "--output", out, "--set", "colour=blue"]) == 2
    assert "unknown key" in capsys.readouterr().err
    assert build_main(["--config", str(TINY), "--output", out, "--set", 'tasks=["digits:0,1,2,3,4"]',
                       "--set", 'held_out=["digits:0,1,2,3,4"]']) == 2
    assert "task list is empty" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert build_main(["--config", str(TINY), "--output", str(tmp_path / "file" / "zoo")]) == 2
    assert "not writable" in capsys.readouterr().err
    concepts = str(ROOT / "jobs" / "specs" / "concepts.yaml")
    assert build_main(["--config", concepts, "--output", out, "--set", 'tasks=["paint it like van gogh"]']) == 2
    assert "tasks:" in capsys.readouterr().err
    assert build_main(["--config", str(TINY), "--output", out, "--set", "dataset=imagefolder:/no/such/dir"]) == 2
    assert "dataset:" in capsys.readouterr().err
    assert build_main(["--config", str(TINY), "--output", out, "--set", "tasks=[]", "--set", "max_tasks=0",
                       "--set", "held_out_every=1"]) == 2
    assert "task list is empty" in capsys.readouterr().err
    assert not (tmp_path / "z" / "members").exists()


@pytest.mark.slow
def test_ray_job_submit_against_local_cluster(tmp_path, ray_head_cluster):
    """`ray start --head` + `ray job submit --working-dir . -- python jobs/build_zoo.py ...`."""
    out = tmp_path / "zoo"
    job = ray_head_cluster.submit([sys.executable, "jobs/build_zoo.py", "--config", "jobs/specs/tiny.yaml",
                                   "--output", str(out), *sum((["--set", f] for f in FAST), [])])
    assert job.returncode == 0, (job.stdout[-3000:], job.stderr[-3000:])
    assert "6 done" in job.stdout
    check_zoo(str(out), 6)


def test_partial_family_trains_only_the_selected_layers(tmp_path, ray_local):
    s = load_config(ZooSpec, ROOT / "jobs" / "specs" / "partial_bn.yaml",
                    [f"output={tmp_path / 'pz'}", "max_tasks=1", "members_per_task=2", "base_epochs=3", "keep_last=5"])
    res = build_zoo(s)
    assert res.done == 2 and res.failed == 0
    zoo = open_zoo(str(tmp_path / "pz"))
    # only the last two BN layers' weight/bias are in the table
    assert zoo.layout.param_names == ["4.weight", "4.bias", "8.weight", "8.bias"]
    mid = zoo.members.column("member_id")[0].as_py()
    ckpts = zoo.state_dicts(mid)
    assert len(ckpts) == 5 and [s for s, _ in ckpts] == sorted(s for s, _ in ckpts)   # consecutive steps
    assert not torch.equal(ckpts[0][1]["8.bias"], ckpts[-1][1]["8.bias"])   # they moved
    assert json.loads(zoo.members.column("metrics")[0].as_py())[-1]["val_acc"] > 0.5
    # both members start from the same base model: their frozen layers are identical
    from rayweights.zoo.families import base_model_state, task_from_condition
    task = task_from_condition(zoo.members.column("condition")[0].as_py())
    assert (tmp_path / "pz" / "base" / f"{task.task_id}.safetensors").exists()   # cached in the zoo
    base = base_model_state(s, task)
    assert "0.weight" in base
    for step, sd in ckpts:                    # the frozen layers are the base's, in every checkpoint
        assert set(sd) == set(zoo.layout.param_names)


def test_concepts_zoo_on_the_actor_pool_resumes_without_retraining_the_base(tmp_path, ray_local):
    """Denoised-Weights concept zoo through Ray Data: base generator trained once (a Ray task) and
    cached; LoRA + BN members on the actor pool; every member beats the base and the identity on
    its own concept; a rerun skips everything and reuses the cached base."""
    from test_zoo_families import _tiny_concepts

    out = tmp_path / "cz"
    s = load_config(ZooSpec, ROOT / "jobs" / "specs" / "concepts.yaml",
                    _tiny_concepts(out) + ['tasks=["give it a red tint", "grayscale", "make it cooler"]',
                                           "held_out=[]", "held_out_every=0"])
    res = build_zoo(s)
    assert (res.done, res.failed) == (3, 0), res.failures
    assert res.score_metric == "val_l1" and res.shared == {"base": "base/generator"}
    zoo = open_zoo(str(out))
    assert set(zoo.conditions()) == {"give it a red tint", "make it black and white", "make it cooler"}
    for mid, cond in zip(zoo.members.column("member_id").to_pylist(), zoo.members.column("condition").to_pylist()):
        m = zoo.metrics(mid)[-1]
        assert m["val_l1"] < 0.9 * m["base_val_l1"], (mid, m)       # every member improves on its start
        if cond != "make it cooler":      # a subtle edit: at this tiny size the identity is hard to beat
            assert m["val_l1"] < 0.9 * m["identity_val_l1"], (mid, m)
    base = out / "base" / "generator" / "diffusion_pytorch_model.safetensors"
    mtime = base.stat().st_mtime_ns
    again = build_zoo(s)
    assert (again.done, again.skipped) == (0, 3) and base.stat().st_mtime_ns == mtime


def test_the_plan_goes_to_ray_data_in_a_bounded_number_of_blocks():
    from rayweights.zoo.builder import MIN_INPUT_BLOCKS, input_blocks

    assert input_blocks(6, 2) == 6                                   # small builds: one member per block
    assert input_blocks(10_000, 2) == MIN_INPUT_BLOCKS == input_blocks(100_000, 2)
    assert input_blocks(100_000, 64) == 16 * 64                      # many workers: 16 blocks each
    assert input_blocks(0, 2) == 1


def test_a_retried_block_does_not_retrain_members_this_build_wrote(tmp_path):
    """A block of several members whose task is retried (actor or node lost) skips the members this
    build already wrote; members written by an earlier build (in the plan because the resume check
    found them corrupt) and missing ones are trained."""
    import time

    from rayweights.config import to_dict
    from rayweights.zoo.builder import _MemberTrainer, prepare, train_and_write

    s = spec(str(tmp_path / "zoo"))
    writer, rows, _ = prepare(s)
    old = train_and_write(s, writer, rows[0])                        # an earlier build's member
    time.sleep(0.05)
    started = time.time()
    written = train_and_write(s, writer, rows[1])                    # written by this build's lost task
    assert old["status"] == written["status"] == "done"
    trainer = _MemberTrainer(to_dict(s), writer.layout.to_json(), {}, skip_written_since=started)
    batch = {k: [r[k] for r in rows[:3]] for k in ("member_id", "task_id", "condition", "group", "classes", "seed")}
    out = trainer(batch)
    assert out["member_id"] == [r["member_id"] for r in rows[:3]] and set(out["status"]) == {"done"}
    assert out["seconds"][1] == 0.0 and out["manifest_row"][1] == ""        # skipped, not retrained
    assert out["score"][1] == pytest.approx(written["score"])
    assert out["seconds"][0] > 0 and out["seconds"][2] > 0                  # retrained / trained
    assert json.loads(out["manifest_row"][0])["member_id"] == rows[0]["member_id"]
    # without the option (one member per block) nothing is skipped
    again = _MemberTrainer(to_dict(s), writer.layout.to_json(), {})({k: v[1:2] for k, v in batch.items()})
    assert again["seconds"][0] > 0


def test_build_with_several_members_per_input_block(tmp_path, ray_local, monkeypatch):
    from rayweights.zoo import builder

    monkeypatch.setattr(builder, "input_blocks", lambda members, workers: 2)
    uri = str(tmp_path / "zoo")
    summary = build_zoo(spec(uri))
    assert (summary.done, summary.skipped, summary.failed, summary.retried) == (6, 0, 0, 0)
    check_zoo(uri, 6)
