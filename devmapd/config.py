"""devmapd configuration: TOML in, frozen dataclasses out.

Every section of ``config/devmapd.toml`` is a frozen dataclass below; the
defaults here ARE the documented defaults (a test loads the shipped file and
compares). Loading is strict: an unknown key or a value of the wrong type is
a :class:`ConfigError` that names the key, because a typo that silently falls
back to a default is how a lab ends up with models on the wrong GPU.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_CONFIG_PATH = "/etc/devmapd/devmapd.toml"


class ConfigError(ValueError):
    """A configuration file or value is unusable; the message names the key."""


@dataclass(frozen=True)
class ServerConfig:
    socket: str = "/run/devmapd/devmapd.sock"
    socket_group: str = ""
    socket_mode: str = "0660"
    fetch_uids: tuple[int, ...] = ()
    fetch_groups: tuple[str, ...] = ()
    operator_uids: tuple[int, ...] = ()
    operator_groups: tuple[str, ...] = ()
    max_frame_bytes: int = 1 << 20
    idle_timeout_s: float = 300.0
    max_connections_per_uid: int = 64
    fetch_timeout_s: float = 600.0

    def mode_bits(self) -> int:
        return int(self.socket_mode, 8)


@dataclass(frozen=True)
class DevicesConfig:
    backend: str = "auto"
    simulate: str = ""
    poll_interval_s: float = 1.0
    reserve_mib: int = 1024
    max_fraction: float = 0.9
    overhead: float = 0.02


@dataclass(frozen=True)
class PlacementConfig:
    policy: str = "best-fit"
    allow_split: bool = True
    host_memory_cap_mib: int = 0
    preload_order: str = "bigger-first"
    load_workers: int = 2
    keep_host_copy: bool = False
    share_storages: bool = False   # one copy per device of storages several models hold (engine/dedup.py)


@dataclass(frozen=True)
class PressureConfig:
    low_watermark_mib: int = 2048
    high_watermark_mib: int = 4096
    cooldown_s: float = 30.0


@dataclass(frozen=True)
class NormalizeConfig:
    strip_prefixes: tuple[str, ...] = ("module.", "_orig_mod.")
    cpu_upcast_half: bool = False
    gpu_dtype: str = ""


@dataclass(frozen=True)
class SafetyConfig:
    allowed_globals: tuple[str, ...] = ()
    max_header_mib: int = 100
    max_tensors: int = 1_000_000
    # Any JSON side file read from a model directory (shard index, config.json...).
    max_side_file_mib: int = 64
    # The object tree (everything but tensor data) may expand through shared references to
    # max(tree_min_nodes, tree_expansion x S) objects and max(tree_min_mib MiB, tree_expansion x S)
    # bytes, S = the file's non-tensor bytes (docs/reliability.md).
    tree_min_nodes: int = 100_000
    tree_min_mib: int = 16
    tree_expansion: int = 16

    def read_option_values(self) -> dict[str, int]:
        """These caps as ``checkpoint.ReadOptions`` keyword arguments (bytes, not MiB)."""
        return {"max_header_bytes": self.max_header_mib << 20, "max_tensors": self.max_tensors,
                "max_side_file_bytes": self.max_side_file_mib << 20, "tree_min_nodes": self.tree_min_nodes,
                "tree_min_bytes": self.tree_min_mib << 20, "tree_expansion": self.tree_expansion}


@dataclass(frozen=True)
class WatchConfig:
    settle_s: float = 1.0
    rescan_interval_s: float = 30.0
    force_polling: bool = False


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = ""
    textfile: str = ""


@dataclass(frozen=True)
class Rule:
    match: str
    devices: tuple[str, ...] = ()
    dtype: str = ""
    preload: str = "eager"
    pin: str = ""
    device_map: tuple[tuple[str, str], ...] = ()

    def matches(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.match)


@dataclass(frozen=True)
class Config:
    model_dir: str = "/srv/models"
    state_dir: str = ""   # empty: systemd's StateDirectory, else per model dir (daemon/statedir.py)
    log_level: str = "info"
    server: ServerConfig = field(default_factory=ServerConfig)
    devices: DevicesConfig = field(default_factory=DevicesConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    pressure: PressureConfig = field(default_factory=PressureConfig)
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    watch: WatchConfig = field(default_factory=WatchConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    rules: tuple[Rule, ...] = ()
    source: str | None = None  # the file this came from, for messages; not a TOML key

    def rule_for(self, name: str) -> Rule | None:
        """The first rule whose glob matches ``name``, as documented."""
        for rule in self.rules:
            if rule.matches(name):
                return rule
        return None

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


# Closed sets of values, checked at load so a typo fails loudly.
_CHOICES: dict[str, tuple[str, ...]] = {
    "log_level": ("debug", "info", "warning", "error"),
    "devices.backend": ("auto", "nvml", "simulated", "none"),
    "placement.policy": ("best-fit", "spread"),
    "placement.preload_order": ("bigger-first", "name"),
    "normalize.gpu_dtype": ("", "float16", "bfloat16"),
    "rules.dtype": ("", "float16", "bfloat16"),
    "rules.preload": ("eager", "lazy"),
}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert lists to tuples."""
    origin = typing.get_origin(tp)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp in (int, str, bool):
        # bool is an int subclass in Python; TOML keeps them apart and so do we.
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if key.endswith("device_map"):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a table of glob = device, got {value!r}")
            return tuple((str(_convert(k, str, key)), _convert(v, str, f"{key}.{k}")) for k, v in value.items())
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_convert(item, args[0], f"{key}[{i}]") for i, item in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        return value
    raise ConfigError(f"{key}: unsupported type {tp!r}")  # pragma: no cover - programming error


def _build(cls: type, table: Any, prefix: str) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a table, got {table!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.name != "source"}
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"unknown key {full!r} (known here: {known})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, full)
        elif key == "rules":
            if not isinstance(value, list):
                raise ConfigError("rules: expected [[rules]] tables")
            kwargs[key] = tuple(_build(Rule, item, f"rules[{i}]") for i, item in enumerate(value))
        else:
            kwargs[key] = _convert(value, tp, full)
        choice_key = full if not full.startswith("rules[") else "rules." + key
        if choice_key in _CHOICES and kwargs[key] not in _CHOICES[choice_key]:
            raise ConfigError(f"{full}: {kwargs[key]!r} is not one of {list(_CHOICES[choice_key])}")
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required key (rules.match) is missing
        raise ConfigError(f"{prefix or 'config'}: {exc}") from None


def _validate(cfg: Config) -> None:
    try:
        mode = cfg.server.mode_bits()
    except ValueError:
        raise ConfigError(f"server.socket_mode: {cfg.server.socket_mode!r} is not an octal mode like '0660'") from None
    if mode & 0o007:
        raise ConfigError(f"server.socket_mode: {cfg.server.socket_mode} gives access to everyone; use 0660 or stricter")
    if not 0 < cfg.devices.max_fraction <= 1:
        raise ConfigError("devices.max_fraction: must be in (0, 1]")
    if cfg.devices.poll_interval_s <= 0:
        raise ConfigError("devices.poll_interval_s: must be > 0")
    if cfg.pressure.high_watermark_mib < cfg.pressure.low_watermark_mib:
        raise ConfigError("pressure.high_watermark_mib: must be >= low_watermark_mib (hysteresis)")
    if cfg.placement.load_workers < 1:
        raise ConfigError("placement.load_workers: must be >= 1")
    for key in ("max_header_mib", "max_tensors", "max_side_file_mib", "tree_min_nodes", "tree_min_mib",
                "tree_expansion"):
        if getattr(cfg.safety, key) < 1:
            raise ConfigError(f"safety.{key}: must be >= 1 (a cap of {getattr(cfg.safety, key)} refuses every model)")
    for i, rule in enumerate(cfg.rules):
        for pattern, device in rule.device_map:
            if not _is_device_id(device):
                raise ConfigError(f"rules[{i}].device_map.{pattern}: {device!r} is not a device like 'cuda:0' or 'cpu'")
        for device in rule.devices + ((rule.pin,) if rule.pin else ()):
            if not _is_device_id(device):
                raise ConfigError(f"rules[{i}]: {device!r} is not a device like 'cuda:0' or 'cpu'")


def _is_device_id(text: str) -> bool:
    if text == "cpu":
        return True
    kind, _, index = text.partition(":")
    return kind == "cuda" and index.isdigit()


def parse(text: str, *, source: str | None = None) -> Config:
    """Parse TOML text into a validated :class:`Config`."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source or 'config'}: not valid TOML: {exc}") from None
    cfg = _build(Config, data, "")
    _validate(cfg)
    return dataclasses.replace(cfg, source=source)


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Load a config file; ``None`` means the system default if it exists, else defaults."""
    if path is None:
        if not Path(DEFAULT_CONFIG_PATH).exists():
            return Config()
        path = DEFAULT_CONFIG_PATH
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    return parse(text, source=str(path))


def shipped_config_path() -> Path:
    """The annotated default config in the source tree (used by tests and install)."""
    return Path(__file__).resolve().parent.parent / "config" / "devmapd.toml"
