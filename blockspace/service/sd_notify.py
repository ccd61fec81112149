"""The sd_notify protocol (sd_notify(3)), for `Type=notify` units: a datagram of
"KEY=VALUE" lines to the Unix socket named by $NOTIFY_SOCKET (an abstract socket when the
name starts with "@"). READY=1 once the volumes are served, STATUS= a line `systemctl
status` shows, STOPPING=1 when the stop begins. Outside systemd there is no socket and every
call is a no-op; a failed send is never fatal (the service works without its status)."""

import logging
import os
import socket
from collections.abc import Callable, Mapping

import trio

log = logging.getLogger(__name__)

STATUS_INTERVAL = 2.0  # seconds between looks at the status line (sent only when it changed)


def socket_address(environ: Mapping[str, str]) -> str | None:
    name = environ.get("NOTIFY_SOCKET", "")
    if not name or name[0] not in "/@":
        return None  # unset, or a vsock address this daemon does not speak
    return "\0" + name[1:] if name[0] == "@" else name


def notify(message: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send `message` ("READY=1\\nSTATUS=...") to systemd; False when there is no socket or
    the send failed. Non-blocking: a full socket drops the message rather than stalling the
    event loop."""
    address = socket_address(os.environ if environ is None else environ)
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode(), socket.MSG_DONTWAIT, address)
    except OSError as error:
        log.debug("sd_notify %r to %s failed: %s", message, address, error)
        return False
    return True


async def report_status(line: Callable[[], str], interval: float = STATUS_INTERVAL) -> None:
    """A daemon task: keep STATUS= up to date with `line()` until cancelled."""
    if socket_address(os.environ) is None:
        return
    sent = None
    while True:
        text = line()
        if text != sent:
            notify(f"STATUS={text}")
            sent = text
        await trio.sleep(interval)
