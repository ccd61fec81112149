"""The host's defaults for what the command line does not say: /etc/blockspace/blockspace.toml
(or $BLOCKSPACE_CONFIG), read with tomllib. A missing file means the built-in defaults; a
file with an unknown section or key, a value of the wrong type or out of range is refused
with one line naming the file and the key, so a typo never silently means a default.

    [daemon]
    io_timeout = 30            # seconds a disk has to answer before it is taken out
    [scrub]
    rate = "100M"              # per second; "0" = unlimited
    [rebuild]
    rate = "0"                 # repair, retire, replace, rebalance moves
    [thresholds]
    pool_full_percent = 80     # a "threshold" event when allocation crosses it (and 90, 95)
    thin_overcommit_percent = 100  # `pool status` warns when thin volumes promise more
    [tier]
    optimizer_period = 300     # seconds between the tier optimizer's scheduled passes
    rate = "64M"               # per second moved between tiers; "0" = unlimited
    [metrics]
    address = ""               # the default of `mount --metrics` (HOST:PORT; "" = off)

Command-line options always win over the file."""

import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from blockspace.errors import InvalidInput
from blockspace.pool.pool import DEFAULT_IO_TIMEOUT
from blockspace.service.metrics_address import parse_metrics_address
from blockspace.tiering.optimizer import DEFAULT_INTERVAL, DEFAULT_RATE
from blockspace.units import parse_size

DEFAULT_PATH = Path("/etc/blockspace/blockspace.toml")
ENV_VAR = "BLOCKSPACE_CONFIG"


@dataclass(frozen=True)
class Config:
    io_timeout: float = DEFAULT_IO_TIMEOUT
    scrub_rate: int = 0
    rebuild_rate: int = 0
    pool_full_percent: int = 80
    thin_overcommit_percent: int = 100
    tier_optimizer_period: float = DEFAULT_INTERVAL
    tier_rate: int = DEFAULT_RATE
    metrics_address: str = ""
    source: str = "built-in defaults"

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _seconds(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not 0.1 <= value <= 3600:  # also refuses nan
        raise ValueError("takes seconds between 0.1 and 3600")
    return float(value)


def _rate(value: object) -> int:
    if not isinstance(value, str):
        raise ValueError('takes a size per second as a string, e.g. "100M" ("0" = unlimited)')
    try:
        return parse_size(value)
    except InvalidInput as error:
        raise ValueError(str(error)) from None


def _percent(value: object) -> int:
    if type(value) is not int or not 1 <= value <= 100:
        raise ValueError("takes a whole percentage from 1 to 100")
    return value


def _overcommit(value: object) -> int:
    if type(value) is not int or not 1 <= value <= 10000:
        raise ValueError("takes a whole percentage from 1 to 10000")
    return value


def _period(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not 1 <= value <= 86400:  # also refuses nan
        raise ValueError("takes seconds between 1 and 86400")
    return float(value)


def _address(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError('takes "HOST:PORT" as a string ("" = off)')
    if value:
        try:
            parse_metrics_address(value)
        except InvalidInput:
            raise ValueError("takes HOST:PORT, e.g. \"127.0.0.1:9469\"") from None
    return value


# section -> key -> (Config field, parser of the TOML value)
_KEYS: dict[str, dict[str, tuple[str, Any]]] = {
    "daemon": {"io_timeout": ("io_timeout", _seconds)},
    "scrub": {"rate": ("scrub_rate", _rate)},
    "rebuild": {"rate": ("rebuild_rate", _rate)},
    "thresholds": {"pool_full_percent": ("pool_full_percent", _percent),
                   "thin_overcommit_percent": ("thin_overcommit_percent", _overcommit)},
    "tier": {"optimizer_period": ("tier_optimizer_period", _period),
             "rate": ("tier_rate", _rate)},
    "metrics": {"address": ("metrics_address", _address)},
}


def config_path() -> Path:
    return Path(os.environ.get(ENV_VAR) or DEFAULT_PATH)


def parse_config(text: str, where: str) -> Config:
    """The Config a TOML document describes; InvalidInput naming `where` and the key."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise InvalidInput(f"{where}: not valid TOML: {error}") from None
    values: dict[str, Any] = {}
    for section, table in document.items():
        keys = _KEYS.get(section)
        if keys is None:
            raise InvalidInput(f"{where}: unknown section [{section}] (known: "
                               f"{', '.join(sorted(_KEYS))})")
        if not isinstance(table, dict):
            raise InvalidInput(f"{where}: {section} must be a [{section}] table")
        for key, value in table.items():
            if key not in keys:
                raise InvalidInput(f"{where}: unknown key {section}.{key} (known: "
                                   f"{', '.join(sorted(keys))})")
            name, parse = keys[key]
            try:
                values[name] = parse(value)
            except ValueError as error:
                raise InvalidInput(f"{where}: {section}.{key} = {value!r}: {error}") from None
    return Config(**values, source=where)


def load_config(path: Path | None = None) -> Config:
    """The host's configuration: the file at `path` (default: $BLOCKSPACE_CONFIG or
    /etc/blockspace/blockspace.toml), or the built-in defaults when there is none."""
    path = config_path() if path is None else path
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Config()
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidInput(f"{path}: cannot be read: {error}") from None
    return parse_config(text, str(path))
