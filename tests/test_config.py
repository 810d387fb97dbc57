"""The config loader: the shipped file stays in step with the code, and bad keys are named."""

from __future__ import annotations

import dataclasses

import pytest

from devmapd import config


def test_shipped_config_is_exactly_the_defaults() -> None:
    loaded = config.load(config.shipped_config_path())
    assert dataclasses.replace(loaded, source=None) == config.Config()


def test_every_default_key_is_documented_in_the_shipped_file() -> None:
    text = config.shipped_config_path().read_text()
    for section in dataclasses.fields(config.Config):
        value = getattr(config.Config(), section.name)
        if dataclasses.is_dataclass(value):
            assert f"[{section.name}]" in text
            for f in dataclasses.fields(value):
                assert f"\n{f.name} = " in text, f"{section.name}.{f.name} missing from config/devmapd.toml"


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("modeldir = '/x'", "'modeldir'"),
        ("[server]\nsockett = '/x'", "'server.sockett'"),
        ("[server]\nsocket = 3", "server.socket"),
        ("[devices]\nmax_fraction = true", "devices.max_fraction"),
        ("[devices]\nbackend = 'cuda'", "devices.backend"),
        ("[pressure]\nlow_watermark_mib = 10\nhigh_watermark_mib = 5", "high_watermark_mib"),
        ("[server]\nsocket_mode = '0666'", "server.socket_mode"),
        ("[[rules]]\nmatch = 'a*'\npreload = 'sometimes'", "rules[0].preload"),
        ("[[rules]]\nmatch = 'a*'\ndevice_map = { 'enc.*' = 'gpu0' }", "rules[0].device_map"),
        ("[[rules]]\ndevices = ['cpu']", "rules[0]"),
        ("[normalize]\nstrip_prefixes = 'module.'", "normalize.strip_prefixes"),
        ("this is not toml", "not valid TOML"),
        ("[safety]\ntree_expansoin = 4", "'safety.tree_expansoin'"),
        ("[safety]\ntree_min_nodes = '100000'", "safety.tree_min_nodes"),
        ("[safety]\ntree_min_mib = 1.5", "safety.tree_min_mib"),
        ("[safety]\ntree_expansion = true", "safety.tree_expansion"),
        ("[safety]\ntree_expansion = 0", "safety.tree_expansion"),
        ("[safety]\nmax_side_file_mib = 0", "safety.max_side_file_mib"),
        ("[safety]\nmax_side_file_mib = -1", "safety.max_side_file_mib"),
        ("[safety]\ntree_min_nodes = 0", "safety.tree_min_nodes"),
    ],
)
def test_bad_values_are_config_errors_naming_the_key(text: str, named: str) -> None:
    with pytest.raises(config.ConfigError, match=named.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.").replace("*", r"\*")):
        config.parse(text)


def test_rules_first_match_wins_and_device_map_keeps_order() -> None:
    cfg = config.parse(
        "[[rules]]\nmatch = 'llama-*'\npin = 'cuda:1'\ndevice_map = { 'enc.*' = 'cuda:0', '*' = 'cpu' }\n"
        "[[rules]]\nmatch = '*'\npreload = 'lazy'\n"
    )
    rule = cfg.rule_for("llama-7b")
    assert rule is not None and rule.pin == "cuda:1"
    assert rule.device_map == (("enc.*", "cuda:0"), ("*", "cpu"))
    other = cfg.rule_for("bert")
    assert other is not None and other.preload == "lazy"


def test_missing_file_is_a_config_error(tmp_path) -> None:
    with pytest.raises(config.ConfigError, match="cannot read config"):
        config.load(tmp_path / "nope.toml")


def test_safety_caps_reach_the_reader_in_bytes() -> None:
    """[safety] keys given in MiB arrive in checkpoint.ReadOptions in bytes, and the defaults of
    the two agree (a daemon that forgets to pass one still applies the documented default)."""
    from devmapd.engine import checkpoint

    cfg = config.parse("[safety]\nmax_side_file_mib = 2\ntree_min_nodes = 500\ntree_min_mib = 3\n"
                       "tree_expansion = 7\n")
    opts = checkpoint.ReadOptions(**cfg.safety.read_option_values())
    assert (opts.max_side_file_bytes, opts.tree_min_nodes, opts.tree_min_bytes, opts.tree_expansion) == \
        (2 << 20, 500, 3 << 20, 7)
    assert opts.tree_caps(1000) == (7000, 3 << 20)
    assert checkpoint.ReadOptions(**config.SafetyConfig().read_option_values()) == checkpoint.ReadOptions()
