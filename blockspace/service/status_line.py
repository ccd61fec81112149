"""The one-line state of a mounted pool, as systemd shows it (`systemctl status
blockspace@tank`: "online, 3 disks", "degraded: rebuilding 40%, 1 of 3 disks failed")."""

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

IN_SERVICE = ("online", "retiring")  # serving data: not a reason to call the pool degraded


def status_line(disk_states: Iterable[str], rebuild: Mapping[str, Any] | None = None,
                scrub: Mapping[str, Any] | None = None) -> str:
    """`disk_states`: the state of each member (retired ones are not counted); `rebuild`
    and `scrub`: their progress records (`to_dict()`), shown while running."""
    states = [s for s in disk_states if s != "retired"]
    out = Counter(s for s in states if s not in IN_SERVICE)
    work = []
    for name, progress in (("rebuilding", rebuild), ("scrubbing", scrub)):
        if progress and progress.get("state") in ("running", "paused"):
            paused = " (paused)" if progress.get("state") == "paused" else ""
            work.append(f"{name} {float(progress.get('percent') or 0.0):.0f}%{paused}")
    disks = f"{len(states)} disk" + ("" if len(states) == 1 else "s")
    if not out:
        return ", ".join([f"online, {disks}", *work])
    lost = ", ".join(f"{count} of {len(states)} disks {state}"
                     for state, count in sorted(out.items()))
    return "degraded: " + ", ".join([*work, lost])
