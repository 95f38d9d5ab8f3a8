"""Typed configs: YAML + overrides, errors that name the key and the file."""

from dataclasses import dataclass
from typing import Literal, Optional

import pytest

from accord_face.config import ConfigError, field, load_config, save_config, to_dict


@dataclass
class Inner:
    lr: float = field(1e-4, help="learning rate")
    kind: Literal["a", "b"] = "a"
    sizes: list[int] = field(default_factory=lambda: [1, 2])

    def validate(self):
        if self.lr <= 0:
            raise ValueError("lr must be positive")


@dataclass
class Outer:
    name: str = "x"
    steps: int = 10
    path: Optional[str] = None
    inner: Inner = field(default_factory=Inner)


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides(tmp_path):
    path = write(tmp_path, "steps: 3\ninner:\n  lr: 0.5\n")
    cfg = load_config(Outer, path, ["inner.kind=b", "inner.sizes=[4, 5]", "path=/tmp/p", "inner.lr=2"])
    assert cfg.steps == 3 and cfg.inner.kind == "b" and cfg.inner.sizes == [4, 5]
    assert cfg.path == "/tmp/p" and cfg.inner.lr == 2.0 and isinstance(cfg.inner.lr, float)


def test_exponent_without_dot_is_a_float(tmp_path):
    # PyYAML (YAML 1.1) parses 1e-4 as a string; the config layer must still read it as a number.
    cfg = load_config(Outer, write(tmp_path, "inner:\n  lr: 1e-4\n"), ["inner.lr=3e-5"])
    assert cfg.inner.lr == 3e-5
    assert load_config(Outer, write(tmp_path, "inner:\n  lr: 1e-4\n")).inner.lr == 1e-4
    with pytest.raises(ConfigError, match="inner.lr"):
        load_config(Outer, write(tmp_path, "inner:\n  lr: fast\n"))


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path, "inner:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"'inner\.lrr'.*c\.yaml"):
        load_config(Outer, path)


def test_unknown_override_blames_command_line(tmp_path):
    with pytest.raises(ConfigError, match=r"'inner\.nope' in command line"):
        load_config(Outer, write(tmp_path, "steps: 1\n"), ["inner.nope=1"])


@pytest.mark.parametrize("text, key", [("steps: ten\n", "steps"), ("inner:\n  kind: c\n", "inner.kind"),
                                       ("inner:\n  sizes: [1, x]\n", r"inner\.sizes\[1\]"),
                                       ("steps: true\n", "steps"), ("inner: 3\n", "inner")])
def test_wrong_type_names_key(tmp_path, text, key):
    with pytest.raises(ConfigError, match=rf"'{key}' in .*c\.yaml"):
        load_config(Outer, write(tmp_path, text))


def test_validate_hook_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="lr must be positive"):
        load_config(Outer, write(tmp_path, "inner:\n  lr: -1\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(Outer, None, ["novalue"])


def test_save_round_trip(tmp_path):
    cfg = load_config(Outer, None, ["inner.lr=0.25", "name=y"])
    save_config(cfg, tmp_path / "out" / "config.yaml")
    assert to_dict(load_config(Outer, tmp_path / "out" / "config.yaml")) == to_dict(cfg)


def test_yaml_12_numbers_in_files_and_overrides(tmp_path):
    """YAML 1.1 reads ``12:30`` as the base-60 integer 750 and ``1e-3`` as a string; ours reads 1.2."""
    from dataclasses import dataclass

    from accord_face.config import load_config, parse_overrides

    assert parse_overrides(["stop_at=12:30", "lr=1e-3", "n=3", "x=0x10", "flag=no"]) == [
        ("stop_at", "12:30"), ("lr", 0.001), ("n", 3), ("x", 16), ("flag", False)]

    @dataclass
    class C:
        stop_at: str = ""
        lr: float = 0.0

    f = tmp_path / "c.yaml"
    f.write_text("stop_at: 06:44\nlr: 5e-5\n")
    c = load_config(C, f)
    assert (c.stop_at, c.lr) == ("06:44", 5e-5)
    assert load_config(C, f, ["stop_at=23:59"]).stop_at == "23:59"
