"""What one event is: a flat JSON object with a class, a pool and a time, plus fields of its
class. Flat and of plain values so that a hook gets every field as an environment variable."""

import time
from typing import Any

# Classes have no "-": a hook named `<class>-anything` is matched without ambiguity.
CLASSES = (
    "disk_state",  # a disk changed state: old_state, state, reason
    "checksum_error",  # blocks of a disk failed their checksum (repaired from redundancy)
    "io_error",  # a volume request failed with an errno other than ENOSPC
    "enospc",  # a write found no free space
    "rebuild_start", "rebuild_finish",  # reason, result (done/failed/cancelled), counts
    "scrub_start", "scrub_finish",  # volume, result, repaired/unrecoverable counts
    "threshold",  # pool allocation crossed a threshold (percent, direction)
    "volume_create", "volume_grow", "volume_delete",
    "mount", "unmount",
)

Event = dict[str, Any]


def make_event(event_class: str, pool: str, *, now: float | None = None, **fields: Any) -> Event:
    """An event of `event_class` in `pool`; fields must be JSON scalars."""
    if event_class not in CLASSES:
        raise ValueError(f"unknown event class {event_class!r}")
    event: Event = {"class": event_class, "pool": pool,
                    "time": time.time() if now is None else now}
    for key, value in fields.items():
        if value is not None and not isinstance(value, str | int | float | bool):
            raise TypeError(f"event field {key} must be a scalar, not {type(value).__name__}")
        event[key] = value
    return event


def describe(event: Event) -> str:
    """One line for a person: the class, then the other fields as key=value."""
    skip = {"class", "pool", "time"}
    details = " ".join(f"{key}={event[key]}" for key in sorted(event) if key not in skip
                       and event[key] is not None)
    return f"{event.get('class', '?')} {details}".rstrip()
