"""Home Assistant MQTT device discovery: one retained config message describing the appliance.

Published on ``homeassistant/device/<node_id>/config`` (HA 2024.11+ device-based discovery):
sensors from the bare telemetry topics, the engine state, a connectivity binary sensor on the
status topic, a restart button, a pause switch and a text box that sends a prompt. The payload
is a pydantic model mirroring HA's schema, so a typo in a key fails here, not silently in HA.

What HA does with it (``homeassistant/components/mqtt/discovery.py`` and ``schemas.py``), and so
what this module does:

- HA copies only availability, ``state_topic`` and ``command_topic`` from the device level into
  the components, never ``qos``: every component carries ``qos: 1`` itself.
- HA acts only on the components present in a message; one that is left out stays as it was.
  A component present with nothing but its ``platform`` is removed. So every component that
  only some installations have is listed in ``OPTIONAL_COMPONENTS`` and, when absent, still
  sent as a platform-only entry; the whole device goes with an empty retained payload
  (``clear_discovery``), sent when discovery is turned off.
- The connectivity sensor has ``availability: []``: with the device's availability it would
  turn *unavailable* instead of *off* when the appliance goes offline.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict

from appliance.topics import Topics

_NODE_BAD = re.compile(r"[^a-zA-Z0-9_-]+")

AVAILABLE = "{{ 'online' if value == 'online' else 'offline' }}"
PAUSED = "{{ 'ON' if value_json.state == 'paused' else 'OFF' }}"


class _HaModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DeviceInfo(_HaModel):
    identifiers: list[str]
    name: str
    manufacturer: str = "appliance"
    model: str = "Generative-AI appliance (AX650N NPU)"
    sw_version: str | None = None


class Origin(_HaModel):
    name: str = "appliance"
    sw_version: str | None = None
    support_url: str | None = None


class Availability(_HaModel):
    topic: str
    value_template: str | None = None
    payload_available: str = "online"
    payload_not_available: str = "offline"


class Component(_HaModel):
    platform: str
    unique_id: str
    name: str
    qos: int = 1
    availability: list[Availability] | None = None  # None: the device's
    state_topic: str | None = None
    command_topic: str | None = None
    value_template: str | None = None
    device_class: str | None = None
    state_class: str | None = None
    unit_of_measurement: str | None = None
    icon: str | None = None
    entity_category: str | None = None
    payload_on: str | None = None
    payload_off: str | None = None
    payload_press: str | None = None
    state_on: str | None = None
    state_off: str | None = None
    min: int | None = None
    max: int | None = None
    mode: str | None = None
    suggested_display_precision: int | None = None
    image_topic: str | None = None
    content_type: str | None = None
    options: list[str] | None = None  # a select's choices


class Removed(_HaModel):
    """A component with nothing but its platform: HA removes the entity it made from it."""

    platform: str


class DiscoveryPayload(_HaModel):
    device: DeviceInfo
    origin: Origin
    availability: list[Availability]
    components: dict[str, Component | Removed]


# Components that only some installations have: object id -> platform. Absent ones are sent as
# platform-only entries so HA removes what an earlier message made. A new optional component is
# added here and in build_discovery.
OPTIONAL_COMPONENTS: dict[str, str] = {
    "picture": "image",  # with an image model
    "picture_prompt": "text",  # with an image model
    "scene": "select",  # with scenes: the current one, and a choice that switches it
}


def node_id_for(base_topic: str) -> str:
    """The node id HA keys the device on, from the base topic (``gallery/north`` -> ``gallery_north``)."""
    node = _NODE_BAD.sub("_", base_topic).strip("_")
    return node or "appliance"


# object_id -> (name, metric topic leaf, unit, device_class, state_class, icon, precision)
_SENSORS: tuple[tuple[str, str, str | None, str | None, str | None, str | None, int | None], ...] = (
    ("temperature_c", "NPU temperature", "°C", "temperature", "measurement", None, 1),
    ("cmm_free_mib", "NPU memory free", "MiB", "data_size", "measurement", None, 0),
    ("npu_load_pct", "NPU load", "%", None, "measurement", "mdi:chip", 0),
    ("queue_depth", "Queue depth", None, None, "measurement", "mdi:tray-full", None),
    ("tokens_per_s", "Tokens per second", "tok/s", None, "measurement", "mdi:speedometer", 1),
)


def build_discovery(
    topics: Topics, *, version: str, model_ids: list[str], name: str | None = None,
    display: str | None = None, image_type: str = "image/png", scenes: list[str] | None = None,
) -> tuple[str, dict[str, Any]]:
    """The config topic and payload (``None`` values left out).

    With ``display`` (an image model is installed): the display's latest picture as an image
    entity, and a text box that asks for a new one.
    """
    node = node_id_for(topics.base)
    components: dict[str, Component | Removed] = {}

    def add(object_id: str, **fields: Any) -> None:
        platform = OPTIONAL_COMPONENTS.get(object_id)
        if platform is not None and platform != fields["platform"]:
            raise ValueError(f"{object_id} is listed as {platform} in OPTIONAL_COMPONENTS")
        components[object_id] = Component(unique_id=f"{node}_{object_id}", **fields)

    for object_id, label, unit, device_class, state_class, icon, precision in _SENSORS:
        add(object_id, platform="sensor", name=label, state_topic=topics.telemetry_metric(object_id),
            unit_of_measurement=unit, device_class=device_class, state_class=state_class, icon=icon,
            suggested_display_precision=precision)
    add("state", platform="sensor", name="State", state_topic=topics.state,
        value_template="{{ value_json.state }}", icon="mdi:state-machine")
    add("status", platform="binary_sensor", name="Status", state_topic=topics.status,
        device_class="connectivity", value_template=AVAILABLE, payload_on="online", payload_off="offline",
        entity_category="diagnostic", availability=[])
    add("restart", platform="button", name="Restart", command_topic=topics.request("restart"),
        payload_press="{}", device_class="restart")
    add("paused", platform="switch", name="Paused", command_topic=topics.request("pause"),
        state_topic=topics.state, value_template=PAUSED, payload_on='{"paused": true}',
        payload_off='{"paused": false}', state_on="ON", state_off="OFF", icon="mdi:pause")
    add("prompt", platform="text", name="Prompt", command_topic=topics.request("chat"), min=1, max=255,
        mode="text", icon="mdi:message-text")
    if display is not None:
        add("picture", platform="image", name="Picture", image_topic=topics.display(display),
            content_type=image_type)
        add("picture_prompt", platform="text", name="Picture prompt", command_topic=topics.request("image"),
            min=1, max=255, mode="text", icon="mdi:image-edit")
    if scenes:
        add("scene", platform="select", name="Scene", command_topic=topics.request("scene"),
            state_topic=topics.scene, value_template="{{ value_json.scene }}", options=scenes,
            icon="mdi:theater")
    for object_id, platform in OPTIONAL_COMPONENTS.items():
        components.setdefault(object_id, Removed(platform=platform))
    payload = DiscoveryPayload(
        device=DeviceInfo(identifiers=[node], name=name or topics.base, sw_version=version,
                          model=f"Generative-AI appliance ({', '.join(model_ids) or 'no models'})"),
        origin=Origin(sw_version=version),
        availability=[Availability(topic=topics.status, value_template=AVAILABLE)],
        components=components,
    )
    return Topics.ha_discovery(node), payload.model_dump(exclude_none=True)


def clear_discovery(topics: Topics) -> tuple[str, str]:
    """The config topic and the empty retained payload that removes the device from HA."""
    return Topics.ha_discovery(node_id_for(topics.base)), ""


def discovery_changed(previous: dict[str, Any] | None, current: dict[str, Any]) -> bool:
    """Publish only when something changed: HA rebuilds entities on every config message."""
    return previous != current
