"""Scenes: the installation's day, switched on a schedule or by request.

A scene names the personas requests may use and the persona a request naming none gets, and may
load or unload models (``prepare`` seconds ahead of its start) so that what it needs fits the
card. Each scene with a ``start`` is an APScheduler cron job; at start-up the appliance enters the
scene whose start came last (looking back a week), so a restart at noon is in the noon scene. A
``{base}/request/scene`` switches at once, until the next scheduled start. The current scene is
retained on ``{base}/scene`` (JSON) and announced as a ``scene_changed`` event; Home Assistant
shows it as a select entity.

The clock is a parameter (``now``), so tests drive the schedule with a simulated one.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from apscheduler.schedulers.base import BaseScheduler
from apscheduler.triggers.date import DateTrigger

from appliance.persona_config import SceneConfig
from appliance.topics import Topics
from npu.engine.engine import Engine

logger = logging.getLogger(__name__)

LOOK_BACK = timedelta(days=8)  # a weekly schedule's last start is always within it
Clock = Callable[[], datetime]


def local_now() -> datetime:
    return datetime.now().astimezone()


def last_start(scene: SceneConfig, now: datetime) -> datetime | None:
    """When the scene's schedule last fired at or before ``now`` (None: not within a week)."""
    trigger = scene.trigger()
    if trigger is None:
        return None
    found, at = None, now - LOOK_BACK
    while (fire := trigger.get_next_fire_time(found, at)) is not None and fire <= now:
        found, at = fire, fire + timedelta(seconds=1)
    return found


def next_start(scene: SceneConfig, now: datetime) -> datetime | None:
    trigger = scene.trigger()
    return None if trigger is None else trigger.get_next_fire_time(None, now)


def scene_in_force(scenes: list[SceneConfig], now: datetime) -> SceneConfig | None:
    """The scheduled scene whose start came last; ``None`` when no schedule fired within a week."""
    starts = [(at, s) for s in scenes if (at := last_start(s, now)) is not None]
    return max(starts, key=lambda item: item[0])[1] if starts else None


class Scenes:
    """Holds the current scene, switches it, and tells the engine, the broker and Home Assistant."""

    def __init__(self, scenes: list[SceneConfig], engine: Engine, publish: Callable[..., Any], topics: Topics,
                 event: Callable[..., None], *, clock: Clock = local_now, apply_models: bool = True) -> None:
        self.scenes = {s.name: s for s in scenes}
        self.engine = engine
        self.publish = publish
        self.topics = topics
        self.event = event
        self.clock = clock
        self.apply_models = apply_models  # load and unload models for a scene (off: personas only)
        self.current: str | None = None
        self.since: datetime | None = None
        self.reason: str | None = None
        self._lock = threading.Lock()
        self._last_tick: datetime | None = None

    def names(self) -> list[str]:
        return list(self.scenes)

    # schedule ---------------------------------------------------------------------------------
    def register(self, scheduler: BaseScheduler) -> None:
        """One cron job per scheduled scene, and its preparation ``prepare`` seconds earlier."""
        for scene in self.scenes.values():
            trigger = scene.trigger()
            if trigger is None:
                continue
            scheduler.add_job(self.switch, trigger, args=[scene.name, "schedule"], id=f"scene-{scene.name}",
                              coalesce=True, max_instances=1, misfire_grace_time=300)
            if scene.prepare and scene.load + scene.unload:
                self._schedule_prepare(scheduler, scene)

    def _schedule_prepare(self, scheduler: BaseScheduler, scene: SceneConfig) -> None:
        start = next_start(scene, self.clock() + timedelta(seconds=scene.prepare))
        if start is None:
            return
        at = start - timedelta(seconds=scene.prepare)

        def prepare() -> None:
            self.prepare(scene.name)
            self._schedule_prepare(scheduler, scene)  # and the next time

        scheduler.add_job(prepare, DateTrigger(at), id=f"scene-prepare-{scene.name}", replace_existing=True)

    def tick(self, now: datetime | None = None) -> str | None:
        """Enter the scene whose scheduled start came last, if one came since the previous tick
        (the first tick: the scene in force now). This is the start-up step and what a simulated
        clock drives; the cron jobs do the same at each start. Returns the scene entered, if any."""
        now = now or self.clock()
        scene = scene_in_force(list(self.scenes.values()), now)
        started = None if scene is None else last_start(scene, now)
        previous, self._last_tick = self._last_tick, now
        if scene is None or (previous is not None and started is not None and started <= previous):
            return None
        self.switch(scene.name, "schedule")
        return scene.name

    def start(self) -> None:
        """At start-up: the scene in force by the schedule, else the first scene, else none."""
        if not self.scenes:
            return
        if self.tick() is None:
            self.switch(next(iter(self.scenes)), "start")

    # switching --------------------------------------------------------------------------------
    def switch(self, name: str, reason: str = "request") -> dict[str, Any]:
        """Make ``name`` the current scene: its personas at once, its models in the background.

        Raises:
            ValueError: no such scene (the message lists the scenes).
        """
        scene = self.scenes.get(name)
        if scene is None:
            raise ValueError(f"there is no scene {name!r}; scenes: {', '.join(self.scenes) or 'none'}")
        with self._lock:
            self.engine.set_personas(scene.personas, scene.default_persona)
            self.current, self.since, self.reason = name, self.clock(), reason
            payload = self.payload()
        self.publish(self.topics.scene, json.dumps(payload), qos=1, retain=True)
        self.event("scene_changed", scene=name, reason=reason, personas=payload["personas"])
        logger.info("scene %s (%s): personas %s", name, reason, ", ".join(payload["personas"]) or "none")
        if self.apply_models and (scene.load or scene.unload):
            threading.Thread(target=self.prepare, args=[name], name=f"scene-{name}", daemon=True).start()
        return payload

    def prepare(self, name: str) -> None:
        """Unload what the scene unloads, then load what it loads (freeing the card first)."""
        scene = self.scenes[name]
        for model in scene.unload:
            try:
                self.engine.unload_model(model, timeout=600)
            except Exception as exc:
                logger.error("scene %s: unloading %s failed: %s", name, model, exc)
        for model in scene.load:
            try:
                self.engine.load_model(model, timeout=600)
            except Exception as exc:
                logger.error("scene %s: loading %s failed: %s", name, model, exc)
                self.event("scene_model_failed", scene=name, model=model, error=str(exc))

    def payload(self) -> dict[str, Any]:
        """What ``{base}/scene`` retains: the scene, its personas, since when, why, and what is next."""
        scene = self.scenes.get(self.current or "")
        upcoming = self.upcoming(self.clock())
        after = {"scene": upcoming[1], "at": upcoming[0].isoformat(timespec="seconds")} if upcoming else None
        return {
            "scene": self.current,
            "personas": [p.name for p in self.engine.personas()],
            "default_persona": scene.default_persona if scene else None,
            "since": self.since.isoformat(timespec="seconds") if self.since else None,
            "reason": self.reason,
            "next": after,
            "scenes": self.names(),
        }

    def upcoming(self, now: datetime) -> tuple[datetime, str] | None:
        later = now + timedelta(seconds=1)  # a start at ``now`` is the one that just began
        starts = [(at, s.name) for s in self.scenes.values() if (at := next_start(s, later)) is not None]
        return min(starts) if starts else None
