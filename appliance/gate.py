"""The prompt gate built from ``moderation:`` (``handlers.moderation.Gate``), files read at start,
and the engine the HTTP bridge, its console and the Wyoming servers are given when the gate is on
(``GatedEngine``, through ``door_engine``: a door listed in ``moderation.trusted`` gets the engine
itself).

A blocklist or curtain file that cannot be read stops the start with a message naming it, as a
bad config key does: an installation that asked for a gate never runs without one. MQTT's
handlers screen a prompt before they submit it (and show the curtain); the HTTP bridge knows
nothing of the gate: its engine refuses in ``submit`` with ``refused``, which the bridge answers as
a 400 like any refusal, and the judge's wait blocks the bridge's thread-pool thread that submits,
never its event loop.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Collection
from typing import Any

from PIL import Image
from prometheus_client import CollectorRegistry

from appliance.config import ApplianceConfig, ConfigError
from handlers.moderation import Blocklist, Gate, Refusal, load_curtain
from npu.engine.api import (
    ChatRequest,
    EngineClient,
    EngineError,
    ErrorCode,
    ImageRequest,
    JobHandle,
    Request,
    Sink,
    SpeechRequest,
)
from npu.engine.engine import Engine

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


JUDGE_WAIT = 120.0  # seconds the HTTP side waits for the judge's answer
VERDICTS_KEPT = 64  # the judge's latest verdicts, so the n choices of one request ask it once
VERDICT_TTL = 60.0


def prompt_of(request: Request) -> tuple[str, str] | None:
    """The text a visitor typed and the request's kind, for the requests the gate screens."""
    if isinstance(request, ChatRequest):
        if request.messages is not None:
            return "\n".join(str(m.get("content", "")) for m in request.messages), "chat"
        return request.prompt or "", "chat"
    if isinstance(request, ImageRequest):
        return request.params.prompt, "image"
    if isinstance(request, SpeechRequest):  # words a speaker says in public are screened as a prompt
        return request.params.text, "speech"
    return None


def param_of(request: Request) -> str:
    """The OpenAI field a refused text came in: ``messages``, ``prompt`` or ``input``."""
    if isinstance(request, ChatRequest):
        return "messages" if request.messages is not None else "prompt"
    return "input" if isinstance(request, SpeechRequest) else "prompt"


def door_engine(engine: Engine, gate: Gate | None, door: str, trusted: Collection[str],
                display: str | None = None) -> EngineClient:
    """The engine a front door submits to: screened by the gate (with ``display``'s rules) unless the
    installer trusts that door."""
    return engine if gate is None or door in trusted else GatedEngine(engine, gate, display)


class GatedEngine:
    """The engine, with ``submit`` screening chat and image prompts and text to speak first;
    everything else is the engine's own."""

    def __init__(self, engine: Engine, gate: Gate, display: str | None = None) -> None:
        self._engine = engine
        self._gate = gate
        self._display = display  # the display its pictures go to: that display's rules apply
        self._verdicts: dict[str, tuple[float, Refusal | None]] = {}
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def submit(self, request: Request, sink: Sink) -> JobHandle:
        found = prompt_of(request)
        if found is not None:
            text, kind = found
            refusal, judge = self._gate.screen(text, self._display)
            if refusal is None and judge:
                refusal = self._judged(text)
            if refusal is not None:
                self._gate.refused(kind, refusal, request_id=request.request_id, sender=request.sender,
                                   display=self._display, text=text)
                raise EngineError(ErrorCode.REFUSED, refusal.message, details={"param": param_of(request)})
        return self._engine.submit(request, sink)

    def _judged(self, text: str) -> Refusal | None:
        now = time.monotonic()
        with self._lock:
            kept = self._verdicts.get(text)
            if kept is not None and now - kept[0] < VERDICT_TTL:
                return kept[1]
        done = threading.Event()
        answer: list[tuple[Refusal | None, EngineError | None]] = []

        def verdict(refusal: Refusal | None, error: EngineError | None) -> None:
            answer.append((refusal, error))
            done.set()

        self._gate.ask_judge(self._engine, text, verdict)
        if not done.wait(JUDGE_WAIT):
            raise EngineError(ErrorCode.TIMEOUT, "the prompt could not be judged in time; retry later")
        refusal, error = answer[0]
        if error is not None:
            raise EngineError(error.code, f"the prompt could not be judged: {error.message}",
                              retry_after=error.retry_after)
        with self._lock:
            if len(self._verdicts) >= VERDICTS_KEPT:
                self._verdicts.pop(next(iter(self._verdicts)))
            self._verdicts[text] = (now, refusal)
        return refusal
