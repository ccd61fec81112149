"""The configuration file: the shipped example parses to the built-in defaults; every
section, key and value is checked, and a mistake is one line naming the file and the key."""

from pathlib import Path

import pytest

from blockspace.admin.config import Config, load_config, parse_config
from blockspace.errors import InvalidInput

EXAMPLE = Path(__file__).resolve().parents[2] / "contrib" / "blockspace.toml"


def test_the_shipped_example_is_the_defaults() -> None:
    assert load_config(EXAMPLE) == Config(source=str(EXAMPLE))


def test_a_missing_file_means_the_defaults(tmp_path: Path) -> None:
    assert load_config(tmp_path / "none.toml") == Config()


def test_values_are_read() -> None:
    config = parse_config('[daemon]\nio_timeout = 2.5\n[scrub]\nrate = "100M"\n'
                          '[rebuild]\nrate = "1G"\n[thresholds]\npool_full_percent = 90\n', "f")
    assert (config.io_timeout, config.scrub_rate, config.rebuild_rate,
            config.pool_full_percent) == (2.5, 100 << 20, 1 << 30, 90)


def test_the_tier_metrics_and_overcommit_keys_are_read() -> None:
    config = parse_config('[thresholds]\nthin_overcommit_percent = 150\n'
                          '[tier]\noptimizer_period = 60\nrate = "0"\n'
                          '[metrics]\naddress = ":9469"\n', "f")
    assert (config.thin_overcommit_percent, config.tier_optimizer_period, config.tier_rate,
            config.metrics_address) == (150, 60.0, 0, ":9469")
    assert (Config().tier_optimizer_period, Config().tier_rate, Config().metrics_address,
            Config().thin_overcommit_percent) == (300.0, 64 << 20, "", 100)


@pytest.mark.parametrize(("text", "message"), [
    ("[thresholds]\nthin_overcommit_percent = 0\n", "takes a whole percentage from 1 to 10000"),
    ("[tier]\noptimizer_period = 0.5\n", "f: tier.optimizer_period = 0.5: takes seconds "
                                         "between 1 and 86400"),
    ("[tier]\nrate = 5\n", "f: tier.rate = 5: takes a size per second as a string"),
    ("[tier]\nperiod = 5\n", "f: unknown key tier.period (known: optimizer_period, rate)"),
    ("[metrics]\naddress = \"nowhere\"\n", "f: metrics.address = 'nowhere': takes HOST:PORT"),
    ("[metrics]\naddress = 9469\n", "f: metrics.address = 9469: takes \"HOST:PORT\""),
    ("[daemon\n", "f: not valid TOML: "),
    ("[deamon]\nio_timeout = 3\n",
     "f: unknown section [deamon] (known: daemon, metrics, rebuild, "),
    ("[daemon]\nio_timout = 3\n", "f: unknown key daemon.io_timout (known: io_timeout)"),
    ("daemon = 3\n", "f: daemon must be a [daemon] table"),
    ("[daemon]\nio_timeout = 0\n", "f: daemon.io_timeout = 0: takes seconds between 0.1 and"),
    ("[daemon]\nio_timeout = true\n", "f: daemon.io_timeout = True: takes seconds"),
    ("[daemon]\nio_timeout = nan\n", "f: daemon.io_timeout = nan: takes seconds"),
    ("[daemon]\nio_timeout = \"30\"\n", "f: daemon.io_timeout = '30': takes seconds"),
    ("[scrub]\nrate = 100\n", "f: scrub.rate = 100: takes a size per second as a string"),
    ("[scrub]\nrate = \"fast\"\n", "f: scrub.rate = 'fast': invalid size 'fast'"),
    ("[thresholds]\npool_full_percent = 0\n", "f: thresholds.pool_full_percent = 0: takes a "),
    ("[thresholds]\npool_full_percent = 80.5\n", "takes a whole percentage"),
])
def test_mistakes_are_one_line_naming_the_key(text: str, message: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_config(text, "f")
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_an_unreadable_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(b"\xff\xfe[daemon]")
    with pytest.raises(InvalidInput, match="bad.toml: cannot be read"):
        load_config(path)


@pytest.mark.parametrize(("configured", "levels"), [
    (80, (80.0, 90.0, 95.0)), (60, (60.0, 90.0, 95.0)), (92, (92.0, 95.0)), (99, (99.0,)),
])
def test_the_configured_fullness_is_where_threshold_events_start(
    tmp_path: Path, configured: int, levels: tuple[float, ...]
) -> None:
    from typing import Any, cast

    from blockspace.service.observe import Observer, Sources

    sources = Sources(cast(Any, None), "tank", "/mnt", lambda: None, dict, dict)
    observer = Observer(sources, tmp_path, hooks=None, pool_full_percent=configured)
    assert observer.thresholds == levels
