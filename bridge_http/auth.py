"""The optional API key: ``Authorization: Bearer <key>`` on ``/v1/*``; ``/health`` stays open.

AUTOMATIC1111 clients send HTTP Basic credentials (its ``--api-auth user:password``): Basic with the
key as the password is accepted too, whatever the user name.
"""

from __future__ import annotations

import base64
import binascii
import hmac

from starlette.requests import Request

from bridge_http.errors import OpenAIError

LOOPBACK = {"127.0.0.1", "::1", "localhost"}


async def require_api_key(request: Request) -> None:
    key: str | None = request.app.state.bridge.settings.api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "basic":
        token = _basic_password(token)
    elif scheme.lower() != "bearer":
        token = ""
    if not token.strip():
        raise OpenAIError(
            401, "missing API key: send 'Authorization: Bearer <key>' (http.api_key)", code="invalid_api_key"
        )
    if not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise OpenAIError(401, "incorrect API key provided", code="invalid_api_key")


def _basic_password(credentials: str) -> str:
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return ""
    return decoded.partition(":")[2]


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """A warning when anyone on the network can use the bridge, else ``None``."""
    if api_key is not None or host in LOOPBACK or host.startswith("127."):
        return None
    return (
        f"the HTTP bridge listens on {host} without an API key: anyone on the network can use it; "
        "set http.api_key (or APPLIANCE_HTTP_API_KEY), or http.host: 127.0.0.1"
    )
