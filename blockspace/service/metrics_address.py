"""The address of the Prometheus endpoint, parsed without prometheus_client: every command
checks `--metrics` and the config file's value, few start the endpoint."""

from blockspace.errors import InvalidInput


def parse_metrics_address(text: str) -> tuple[str, int]:
    """HOST:PORT (or [v6]:PORT, or :PORT for 127.0.0.1) of --metrics."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise InvalidInput(f"--metrics takes HOST:PORT (e.g. 127.0.0.1:9469), not {text!r}")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port_text)
