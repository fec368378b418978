from dataclasses import dataclass, field

import pytest

from rayweights.config import ConfigError, load_config


@dataclass
class Inner:
    lr: float = 1e-3
    steps: int = 10


@dataclass
class Outer:
    name: str
    inner: Inner = field(default_factory=Inner)
    tags: list[str] = field(default_factory=list)
    mode: str | None = None

    def __post_init__(self):
        if self.inner.steps <= 0:
            raise ValueError("inner.steps: must be positive")


def test_load_with_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: a\ninner:\n  lr: 1e-2\n")
    cfg = load_config(Outer, p, ["inner.steps=5", "tags=[x, y]"])
    assert cfg.inner.lr == 0.01 and cfg.inner.steps == 5 and cfg.tags == ["x", "y"]


def test_unknown_key_names_the_field(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: a\ninner:\n  lrr: 1\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) in inner: lrr"):
        load_config(Outer, p)


def test_type_and_missing_and_validation_errors(tmp_path):
    with pytest.raises(ConfigError, match="inner.steps: expected an integer"):
        load_config(Outer, None, ["name=a", "inner.steps=abc"])
    with pytest.raises(ConfigError, match="missing required key: name"):
        load_config(Outer, None, [])
    with pytest.raises(ConfigError, match="inner.steps: must be positive"):
        load_config(Outer, None, ["name=a", "inner.steps=0"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, tmp_path / "nope.yaml")


def test_override_value_reads_back_as_itself():
    """Every writer of ``key=value`` overrides (jobs' --output, pipeline stages, sweep trials) uses
    override_value; apply_overrides must read each value back unchanged, type included."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from rayweights.config import apply_overrides, override_value

    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.text(min_size=1, max_size=8), inner, max_size=4), max_leaves=10)

    @settings(max_examples=300, deadline=None)
    @given(values)
    def roundtrip(v):
        data = apply_overrides({}, [f"a.b={override_value(v)}"])
        assert data["a"]["b"] == v and type(data["a"]["b"]) is type(v)

    roundtrip()
    assert override_value(1e-05) == "1.0e-05"     # json.dumps gives "1e-05": a string to YAML 1.1
