"""Summaries of py-spy's collapsed stacks (`py-spy record --format raw`). Pure.

A line is `frame;frame;...;frame COUNT`, outermost frame first; a frame is
`function (file:line)`, or with `--threads` a leading `thread (0x...)` / `process ...` frame.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


@dataclass
class ProfileSummary:
    samples: int = 0
    self_samples: Counter[str] = field(default_factory=Counter)  # innermost frame
    self_lines: Counter[str] = field(default_factory=Counter)  # innermost frame, with line
    total_samples: Counter[str] = field(default_factory=Counter)  # anywhere on the stack
    threads: Counter[str] = field(default_factory=Counter)
    # innermost frame (with line) per thread group ("MainThread", "blockspace-io diskN.img#N")
    group_lines: dict[str, Counter[str]] = field(default_factory=dict)
    group_threads: dict[str, set[str]] = field(default_factory=dict)
    idle_samples: int = 0  # innermost frame is a wait (select/epoll/queue get/lock)

    def share(self, count: int) -> float:
        return count / self.samples if self.samples else 0.0


def frame_key(frame: str, *, line: bool = False) -> str:
    """`function (file)`, the file shortened to its last two path parts and without the line
    number (so all lines of one function add up), or with it (`line=True`)."""
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match.group("file")
    if "blockspace/" in path:  # the package's own files by their path inside it
        short = path[path.rindex("blockspace/"):]
    else:
        short = os.path.join(*path.split("/")[-2:]) if "/" in path else path
    if line and match.group("line"):
        short = f"{short}:{match.group('line')}"
    return f"{match.group('func')} ({short})"


_IDLE = ("select (", "epoll", "poll (", "get (queue", "_worker_loop", "wait (threading",
         "acquire", "get_events")


# Outer frames every sample of a thread shares: left out of the inclusive list.
_BORING = re.compile(r"\((<frozen runpy>|threading\.py|.*__main__\.py|blockspace/cli/main\.py)\)$"
                     r"|^run \((_core/_run\.py|blockspace/service/daemon\.py)\)$")


def thread_group(thread: str) -> str:
    """`thread (123): blockspace-io disk2.img#3` -> `blockspace-io diskN.img#N`."""
    name = thread.split("): ", 1)[1] if "): " in thread else thread
    return re.sub(r"\d+", "N", name)


def _is_thread_frame(frame: str) -> bool:
    return frame.startswith(("thread (", "process ")) or frame.startswith("Thread ")


def summarize(text: str) -> ProfileSummary:
    summary = ProfileSummary()
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        stack_text, _, count_text = line.rpartition(" ")
        try:
            count = int(count_text)
        except ValueError:
            continue
        frames = [f for f in stack_text.split(";") if f]
        thread = "main"
        while frames and _is_thread_frame(frames[0]):
            thread = frames.pop(0)
        if not frames:
            continue
        summary.samples += count
        summary.threads[thread] += count
        keys = [frame_key(f) for f in frames]
        summary.self_samples[keys[-1]] += count
        line_key = frame_key(frames[-1], line=True)
        summary.self_lines[line_key] += count
        group = thread_group(thread)
        summary.group_lines.setdefault(group, Counter())[line_key] += count
        summary.group_threads.setdefault(group, set()).add(thread)
        for key in set(keys):
            summary.total_samples[key] += count
        if any(marker in frames[-1] for marker in _IDLE):
            summary.idle_samples += count
    return summary


def render(summary: ProfileSummary, top: int = 15, *, title: str = "",
           expected_per_thread: float | None = None, idle_included: bool = False) -> str:
    """A plain-text report: sample count, threads, top self and inclusive frames.
    `expected_per_thread` (rate x seconds) turns sample counts into "busy" fractions of the
    wall time: with `py-spy --gil`, the total is how much of the time the GIL was held. With
    `idle_included` (py-spy --idle) every thread is sampled all the time, so the per-group
    breakdown is where each thread's wall time goes, waits included."""
    lines = [title] if title else []
    busy = ""
    if expected_per_thread and not idle_included:
        busy = f", {summary.samples / expected_per_thread:.0%} of the wall time"
    lines += [f"samples: {summary.samples}{busy} (innermost frame a wait: "
              f"{summary.share(summary.idle_samples):.0%})", "", "threads (share of samples"
              + (", busy fraction of wall time)" if expected_per_thread and not idle_included
                 else ")") + ":"]
    for thread, count in summary.threads.most_common(8):
        extra = (f"  busy {count / expected_per_thread:5.0%}"
                 if expected_per_thread and not idle_included else "")
        lines.append(f"  {summary.share(count):6.1%}{extra}  {thread}")
    if expected_per_thread and len(summary.group_lines) > 1:
        for group, counter in sorted(summary.group_lines.items(),
                                     key=lambda item: -sum(item[1].values())):
            members = len(summary.group_threads[group])
            wall = expected_per_thread * members
            lines += ["", f"{group} ({members} thread{'s' if members > 1 else ''}): "
                      "where its wall time goes (innermost frame, share of "
                      f"{members} x wall time):"]
            for key, count in counter.most_common(8):
                lines.append(f"  {count / wall:6.1%}  {key}")
    lines += ["", f"top {top} by self samples (innermost frame):"]
    for key, count in summary.self_samples.most_common(top):
        lines.append(f"  {summary.share(count):6.1%}  {key}")
    lines += ["", f"top {top} lines by self samples:"]
    for key, count in summary.self_lines.most_common(top):
        lines.append(f"  {summary.share(count):6.1%}  {key}")
    lines += ["", f"top {top} by inclusive samples (anywhere on the stack):"]
    interesting = [(k, c) for k, c in summary.total_samples.most_common()
                   if not _BORING.search(k)]
    for key, count in interesting[:top]:
        lines.append(f"  {summary.share(count):6.1%}  {key}")
    return "\n".join(lines) + "\n"
