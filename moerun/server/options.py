"""`moerun serve`'s hardening flags (limits, shutdown, who may read /metrics) and their checks.

Import-light on purpose (no FastAPI, no uvicorn): the CLI builds its parser for every command.
"""

import argparse
import ipaddress

from moerun.config import parse_size
from moerun.errors import MoerunError

MAX_REQUEST_BYTES = 32 * 2**20  # a larger request body is a 413
RESPONSE_STORE_BYTES = 256 * 2**20  # stored responses past this go, oldest first
SHUTDOWN_TIMEOUT_S = 5.0  # running requests get this long after SIGTERM


def add_flags(v: argparse.ArgumentParser) -> None:
    v.add_argument("--max-request-bytes", type=parse_size, default=MAX_REQUEST_BYTES,
                   help="largest request body (e.g. 32MiB); a larger one is a 413")  # fmt: skip
    v.add_argument("--response-store-bytes", type=parse_size, default=RESPONSE_STORE_BYTES,
                   help="memory for stored responses (previous_response_id); the oldest go "
                   "first")  # fmt: skip
    v.add_argument("--shutdown-timeout", type=float, default=SHUTDOWN_TIMEOUT_S,
                   help="seconds running requests get after SIGTERM/SIGINT before they are "
                   "aborted; a second signal exits at once")  # fmt: skip
    v.add_argument("--metrics-no-auth", action="store_true",
                   help="serve /metrics without the API key")  # fmt: skip


def check(args: argparse.Namespace) -> None:
    """MoerunError for values the server cannot run with."""
    if args.api_key is not None and not args.api_key.strip():
        raise MoerunError("--api-key must not be empty (leave it out to serve without a key)")
    if args.max_request_bytes < 1:
        raise MoerunError("--max-request-bytes must be at least 1 byte")
    if args.response_store_bytes < 0:
        raise MoerunError("--response-store-bytes must be >= 0")
    if not args.shutdown_timeout >= 0:  # also NaN
        raise MoerunError("--shutdown-timeout must be >= 0 seconds")


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """A warning when anyone on the network can use the server: no key, a non-loopback host."""
    if api_key is not None or host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:  # a host name: assume it reaches beyond this machine
        pass
    return (f"moerun: warning: serving on {host} without --api-key: anyone who can reach this "
            "address can use the model")  # fmt: skip
