"""The prompt gate built from ``moderation:`` (``handlers.moderation.Gate``), files read at start.

A blocklist or curtain file that cannot be read stops the start with a message naming it, as a
bad config key does: an installation that asked for a gate never runs without one.
"""

from __future__ import annotations

import io
from collections.abc import Callable

from PIL import Image
from prometheus_client import CollectorRegistry

from appliance.config import ApplianceConfig, ConfigError
from handlers.moderation import Blocklist, Gate, load_curtain

CURTAIN_SIZE = (512, 512)
CURTAIN_COLOUR = (24, 24, 28)


def make_gate(config: ApplianceConfig, event: Callable[..., None],
              registry: CollectorRegistry) -> Gate | None:
    """The gate, or None when no rule turns it on anywhere; ``ConfigError`` names a bad file."""
    try:
        return _make_gate(config, event, registry)
    except ValueError as exc:
        raise ConfigError(f"moderation: {exc}") from None


def _make_gate(config: ApplianceConfig, event: Callable[..., None],
               registry: CollectorRegistry) -> Gate | None:
    m = config.moderation
    if not m.enabled and not any(rules.enabled for rules in m.displays.values()):
        return None
    main = Blocklist.load(config.config_path(m.blocklist)) if m.blocklist else Blocklist()
    displays: dict[str, tuple[bool | None, Blocklist | None, bool | None]] = {}
    for name, rules in m.displays.items():
        extra = Blocklist.load(config.config_path(rules.blocklist)) if rules.blocklist else None
        displays[name] = (rules.enabled, extra, rules.judge)
    curtain, curtain_type = plain_curtain(), "image/png"
    if m.curtain:
        curtain, curtain_type = load_curtain(config.config_path(m.curtain))
    return Gate(enabled=m.enabled, blocklist=main, judge=m.judge, judge_model=m.judge_model,
                displays=displays, log_prompts=m.log_prompts, event=event, registry=registry,
                curtain=curtain, curtain_type=curtain_type)


def plain_curtain() -> bytes:
    """A plain dark picture: what a display shows in place of a refused one by default."""
    buffer = io.BytesIO()
    Image.new("RGB", CURTAIN_SIZE, CURTAIN_COLOUR).save(buffer, format="PNG")
    return buffer.getvalue()
