"""configlib overrides and the CLI dispatcher."""
import dataclasses

import pytest

from jaxsae import cli, configlib


@dataclasses.dataclass(frozen=True)
class Cfg:
    steps: int = 10  # how many steps
    lr: float = 1e-3  # learning rate
    name: str = "a"  # run name
    flag: bool = False  # a switch
    layers: tuple[int, ...] = (14,)  # layers to read
    extra: int | None = None  # optional


def test_override_coerces_each_field_type():
    cfg = configlib.override(Cfg(), ["steps=5", "lr=2e-4", "name=b", "flag=true", "layers=3,7", "extra=none"])
    assert cfg == Cfg(steps=5, lr=2e-4, name="b", flag=True, layers=(3, 7), extra=None)
    assert configlib.override(Cfg(), ["--steps=1e3"]).steps == 1000
    assert configlib.override(Cfg(), ["extra=4"]).extra == 4


@pytest.mark.parametrize("flag", ["-h", "--help", "help"])
def test_parse_prints_usage_and_field_help_instead_of_a_config(flag, capsys):
    assert configlib.parse(Cfg(), ["steps=5", flag], "usage: prog\n") is None
    out = capsys.readouterr().out
    assert out.startswith("usage: prog\nCfg fields") and "steps=10  # how many steps" in out


def test_parse_applies_overrides_like_override():
    assert configlib.parse(Cfg(), ["steps=5", "name=b"]) == Cfg(steps=5, name="b")
    with pytest.raises(ValueError, match="unknown config field 'nope'"):
        configlib.parse(Cfg(), ["nope=1"])


@pytest.mark.parametrize("bad, msg", [("nope=1", "unknown config field 'nope'"), ("steps", "key=value"),
                                      ("steps=abc", "expected int"), ("flag=maybe", "expected a boolean")])
def test_override_rejects_bad_input_naming_it(bad, msg):
    with pytest.raises(ValueError, match=msg):
        configlib.override(Cfg(), [bad])


def test_help_lists_each_field_with_its_comment():
    text = configlib.help_text(Cfg())
    for f in dataclasses.fields(Cfg):
        assert f"  {f.name}=" in text
    assert "# learning rate" in text and "# layers to read" in text


def test_dispatch_usage_and_unknown_command(capsys):
    assert cli.main([]) == 0
    assert cli.main(["bogus"]) == 2
    assert "usage: jaxsae {" + ",".join(cli.COMMANDS) + "}" in capsys.readouterr().out
