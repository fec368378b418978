"""Every cluster YAML passes Ray's own autoscaler validation (the schema Ray ships)."""

import copy
from pathlib import Path

import pytest
import yaml

CLUSTERS = sorted((Path(__file__).resolve().parents[1] / "clusters").glob("*.yaml"))


def test_there_are_cluster_configs():
    names = {p.name for p in CLUSTERS}
    assert {"aws-train-generator.yaml", "aws-build-zoo.yaml", "local-onprem.yaml"} <= names


@pytest.mark.parametrize("path", CLUSTERS, ids=lambda p: p.name)
def test_cluster_yaml_validates(path):
    from ray.autoscaler._private.commands import prepare_config
    from ray.autoscaler._private.util import validate_config

    raw = yaml.safe_load(path.read_text())
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    assert any("scripts/install.sh" in c for c in raw["setup_commands"]), "each cluster installs rayweights"


def test_validation_catches_a_broken_config():
    import jsonschema
    from ray.autoscaler._private.commands import prepare_config
    from ray.autoscaler._private.util import validate_config

    raw = yaml.safe_load((CLUSTERS[0]).read_text())
    raw["not_a_ray_field"] = 1
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        validate_config(prepare_config(raw))


def test_training_cluster_has_32_to_64_a100s():
    raw = yaml.safe_load(Path(CLUSTERS[0]).parent.joinpath("aws-train-generator.yaml").read_text())
    worker = raw["available_node_types"]["a100_worker"]
    assert worker["node_config"]["InstanceType"].startswith("p4d")
    assert 8 * worker["min_workers"] == 32 and 8 * worker["max_workers"] == 64
