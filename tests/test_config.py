from pathlib import Path

import pytest

from kvstore.config import StoreConfig
from kvstore.errors import ConfigError


def test_precedence_defaults_toml_env_overrides(tmp_path: Path) -> None:
    toml = tmp_path / "kv.toml"
    toml.write_text(
        'eviction = "prefix-lru"\n[dram]\ncapacity = "64MiB"\nhigh_watermark = 0.8\n'
        '[ssd]\npath = "/tmp/a"\ncapacity = "1GiB"\n'
    )
    cfg = StoreConfig.load(
        toml,
        env={"KVSTORE_SSD_CAPACITY": "2GiB"},
        overrides={"ssd.path": "/tmp/b"},
        defaults={"ssd.path": "/tmp/default", "dram.prefault": False},
    )
    assert cfg.dram.capacity == 64 << 20 and cfg.dram.high_watermark == 0.8
    assert cfg.ssd.capacity == 2 << 30
    assert cfg.ssd.path == Path("/tmp/b")
    assert cfg.dram.prefault is False


@pytest.mark.parametrize(
    "overrides",
    [
        {"dram.capacity": "-5"},
        {"dram.capcity": "1GiB"},
        {"dram.low_watermark": 0.95},
        {"ssd.compression": "zstd"},
        {"dram.hugepages": "maybe"},
    ],
)
def test_bad_values_are_named_in_the_error(overrides: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        StoreConfig.load(overrides=overrides)


def test_unreadable_toml(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[dram\n")
    with pytest.raises(ConfigError, match="is not TOML"):
        StoreConfig.load(bad)
