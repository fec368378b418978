"""Cluster files that would really boot: every YAML passes Ray's own autoscaler validation (the schema Ray
ships), names only files that exist, installs the locked environment, and gets S3 access from an instance
profile; the training cluster has EFA networking in a cluster placement group."""

import copy
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = sorted((ROOT / "clusters").glob("*.yaml"))
AWS = [p for p in CLUSTERS if yaml.safe_load(p.read_text())["provider"]["type"] == "aws"]
# a repository path inside a command: jobs/..., clusters/..., scripts/..., docker/..., tune_spaces/...
REPO_PATH = re.compile(r"(?<![\w/~.])((?:jobs|clusters|scripts|docker|tune_spaces|bench)/[\w./-]*\w)")


def _raw(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_there_are_cluster_configs():
    names = {p.name for p in CLUSTERS}
    assert {"aws-train-generator.yaml", "aws-build-zoo.yaml", "local-onprem.yaml"} <= names


@pytest.mark.parametrize("path", CLUSTERS, ids=lambda p: p.name)
def test_cluster_yaml_validates(path):
    from ray.autoscaler._private.commands import prepare_config
    from ray.autoscaler._private.util import validate_config

    validate_config(prepare_config(copy.deepcopy(_raw(path))))


def test_validation_catches_a_broken_config():
    import jsonschema
    from ray.autoscaler._private.commands import prepare_config
    from ray.autoscaler._private.util import validate_config

    raw = _raw(CLUSTERS[0])
    raw["not_a_ray_field"] = 1
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        validate_config(prepare_config(raw))


@pytest.mark.parametrize("path", CLUSTERS, ids=lambda p: p.name)
def test_every_file_a_cluster_names_exists(path):
    """Header comments (the commands a user copies) and the YAML's own commands name real files."""
    named = set(REPO_PATH.findall(path.read_text()))
    assert named, f"{path.name} names no file of the repository"
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"{path.name} names files that do not exist: {missing}"


def test_the_path_check_catches_a_missing_file():
    assert REPO_PATH.findall("python jobs/train_generator.py --config jobs/configs/blockunet_8x8_a100.yaml") == [
        "jobs/train_generator.py", "jobs/configs/blockunet_8x8_a100.yaml"]
    assert not (ROOT / "jobs/configs/blockunet_8x8_a100.yaml").exists()


@pytest.mark.parametrize("path", CLUSTERS, ids=lambda p: p.name)
def test_every_node_installs_the_lock(path):
    """Either a pinned image built from docker/Dockerfile (which runs scripts/install.sh on the lock) or
    scripts/install.sh in the setup commands."""
    raw = _raw(path)
    if "docker" in raw:
        image = raw["docker"]["image"]
        assert re.search(r":[\w.-]+$", image) and not image.endswith(":latest"), f"unpinned image {image}"
        dockerfile = (ROOT / "docker/Dockerfile").read_text()
        assert "scripts/install.sh" in dockerfile and "requirements.lock" in dockerfile
    else:
        assert any("scripts/install.sh" in c for c in raw["setup_commands"]), "each cluster installs rayweights"


@pytest.mark.parametrize("path", AWS, ids=lambda p: p.name)
def test_s3_access_through_instance_profiles_never_keys(path):
    raw = _raw(path)
    for name, node in raw["available_node_types"].items():
        assert "Arn" in node["node_config"].get("IamInstanceProfile", {}), f"{name} has no IAM instance profile"
    assert not re.search(r"AWS_(SECRET_ACCESS_KEY|ACCESS_KEY_ID|SESSION_TOKEN)|aws_secret", path.read_text(), re.I)


def test_training_cluster_has_32_to_64_a100s_with_efa():
    raw = _raw(ROOT / "clusters/aws-train-generator.yaml")
    worker = raw["available_node_types"]["a100_worker"]
    cfg = worker["node_config"]
    assert cfg["InstanceType"].startswith("p4d")
    assert 8 * worker["min_workers"] == 32 and 8 * worker["max_workers"] == 64
    efa = [n for n in cfg["NetworkInterfaces"] if n["InterfaceType"] == "efa"]
    assert sorted(n["NetworkCardIndex"] for n in efa) == [0, 1, 2, 3]          # one per network card
    assert cfg["Placement"]["GroupName"], "a cluster placement group"
    assert "," not in raw["provider"]["availability_zone"], "a placement group lives in one AZ"
    env = " ".join(raw["docker"]["worker_run_options"])
    assert "FI_PROVIDER=efa" in env and "/dev/infiniband/uverbs0" in env


def test_zoo_cluster_uses_spot_pools():
    raw = _raw(ROOT / "clusters/aws-build-zoo.yaml")
    workers = [n for k, n in raw["available_node_types"].items() if k != raw["head_node_type"]]
    assert len(workers) >= 2 and all(n["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
                                     for n in workers)
