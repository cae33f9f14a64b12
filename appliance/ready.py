"""The one log line that says the appliance is ready, and how to talk to it.

A person who just ran ``appliance run`` (or reads the journal) learns from it that the models are
loaded, the broker is connected and the HTTP bridge listens, and which topics and URL to use:
the same things ``scripts/demo`` prints before it starts the appliance.
"""

from __future__ import annotations

from appliance.topics import Topics

ANY_ADDRESS = ("0.0.0.0", "::", "")


def http_base_url(host: str, port: int) -> str:
    """The bridge's base URL as a client on this machine uses it (every interface: loopback)."""
    shown = "127.0.0.1" if host in ANY_ADDRESS else f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/v1"


def ready_message(topics: Topics, broker: str, models: list[str], http_url: str | None,
                  http_note: str | None = None) -> str:
    """``ready: ...`` with the request, response and stream topics of the base topic, and the URL."""
    http = f"OpenAI-compatible API at {http_url}" if http_url else f"HTTP bridge {http_note or 'off'}"
    return (
        f"ready: models {', '.join(models) or 'none'} loaded; MQTT broker {broker}: send prompts to "
        f"{topics.request('chat')}, answers on {topics.response('chat')} "
        f"(streams on {topics.stream('<id>')}, state on {topics.state}); {http}"
    )
