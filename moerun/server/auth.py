"""The API key check (serve --api-key): which routes need the key, and how the header is read.

Open without a key: /health (load balancers, GET and HEAD) and the API docs (/docs, /redoc,
/openapi.json: they describe the routes, never the model or its traffic). /metrics needs the key
unless `serve --metrics-no-auth` (request counts and latencies are traffic).
"""

import hmac

OPEN_PATHS = frozenset({"/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


def needs_key(path: str, metrics_no_auth: bool) -> bool:
    return path not in OPEN_PATHS and not (metrics_no_auth and path == "/metrics")


def authorized(header: str, key: str) -> bool:
    """`Authorization: Bearer KEY`, the scheme in any case (RFC 7235); compared in constant time."""
    scheme, _, token = header.strip().partition(" ")
    given = token.strip().encode()
    return scheme.lower() == "bearer" and hmac.compare_digest(given, key.encode())
