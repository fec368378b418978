from pathlib import Path

import pytest

from rayweights.config import ConfigError
from rayweights.sweep import SweepSpace, load_space, to_tune_space

SPACES = sorted((Path(__file__).resolve().parents[1] / "tune_spaces").glob("*.yaml"))


def test_spaces_exist():
    assert {p.stem for p in SPACES} >= {"block_size", "grouping_rule", "pdiff_noise", "diffusion"}


def test_space_errors_name_the_field(tmp_path):
    base = Path(__file__).resolve().parents[1] / "tune_spaces" / "block_size.yaml"
    bad = tmp_path / "bad.yaml"
    bad.write_text(base.read_text().replace("grid_search", "gridsearch"))
    with pytest.raises(ConfigError, match="space.block_size"):
        load_space(bad)
    with pytest.raises(ConfigError, match="mode"):
        load_space(base, ["mode=sideways"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_space(base, ["metrc=x"])
    with pytest.raises(ConfigError, match="scheduler.type"):
        load_space(base, ["scheduler.type=hyperband"])
    with pytest.raises(ConfigError, match="space.blok_size: not a valid key"):
        load_space(base, ["space={blok_size: {grid_search: [128]}}"])
    with pytest.raises(ConfigError, match="fixed.rounds"):
        load_space(base, ["fixed={rounds: many}"])
    bad.write_text(base.read_text().replace("jobs/configs/sweep_denoised_weights.yaml", "nope.yaml"))
    with pytest.raises(ConfigError, match="base_config"):
        load_space(bad)


def test_space_converts_to_tune_distributions():
    from ray import tune

    space = SweepSpace(name="x", base_config="b.yaml", metric="m", space={
        "block_size": {"grid_search": [128, 256]}, "lr": {"loguniform": [1e-4, 1e-2]},
        "rule": {"choice": [1, 2, 3]}, "input_noise": {"uniform": [0.0, 0.1]}})
    ts = to_tune_space(space)
    assert ts["block_size"] == tune.grid_search([128, 256])
    lr = ts["lr"].sample()
    assert 1e-4 <= lr <= 1e-2
    assert ts["rule"].sample() in (1, 2, 3)


def test_documented_example_space_loads(tmp_path):
    """The space shown in rayweights.sweep's docstring is a valid space for the shipped base."""
    import textwrap

    import rayweights.sweep as sweep

    doc = sweep.__doc__
    block = doc[doc.index("    name: block_size"):doc.index("Each trial applies")]
    text = textwrap.dedent(block).replace("jobs/configs/sweep_base.yaml",
                                          str(Path(__file__).resolve().parents[1] / "jobs/configs/sweep_base.yaml"))
    f = tmp_path / "doc_space.yaml"
    f.write_text(text)
    space = load_space(f)
    assert space.fixed == {"rounds": 4} and set(space.space) == {"block_size", "lr"}
