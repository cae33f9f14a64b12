"""The engine's job API: what both front doors (MQTT handlers, HTTP bridge) submit and receive.

``EngineClient`` is the whole of the engine a front door sees; the front doors import this module
and nothing else of ``npu.engine``. A front door builds a request, calls ``submit`` with a sink,
and gets a ``JobHandle``.
The sink is called on the engine's worker thread with each ``JobEvent``; it must not block (the
MQTT side publishes, which paho queues; the HTTP side hands the event to its asyncio loop with
``call_soon_threadsafe``). Every accepted job gets exactly one terminal event, ``Done`` or
``Failed``; a refused job raises ``EngineError`` from ``submit`` and gets no events.
"""

from __future__ import annotations

import enum
import itertools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from npu.device.base import DeviceReading
from npu.diffusion.params import ImageOutput, ImageParams
from npu.llm.params import FinishReason, GenerationParams, TokenLogprob, Usage
from npu.speech.params import Clip, Piece, Segment, SpeechParams

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry


class ErrorCode(enum.StrEnum):
    """Typed failures; each front door maps them to its own protocol (MQTT code, HTTP status)."""

    BAD_REQUEST = "bad_request"
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
    BUSY = "busy"
    RATE_LIMITED = "rate_limited"  # one sender over its own limits; others are not affected
    REFUSED = "refused"  # the prompt gate (``moderation:``) turned the prompt away
    MODEL_NOT_FOUND = "model_not_found"
    TIMEOUT = "timeout"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    UNAVAILABLE = "unavailable"
    DEVICE_RESET = "device_reset"
    INTERNAL = "internal"


class EngineError(Exception):
    """A typed failure; ``details`` holds machine-readable facts (e.g. the lengths of a long prompt)."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        retry_after: float | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.details = details or {}

    def __repr__(self) -> str:
        return f"EngineError({self.code.value}, {self.message!r})"


def persona_missing(name: str, available: Sequence[str]) -> EngineError:
    """The one refusal of a persona requests may not name now (unknown, or left out of the current
    scene), whichever front door and field named it: MQTT ``persona`` or ``model``, HTTP ``model``
    or ``extra_body`` persona."""
    return EngineError(ErrorCode.MODEL_NOT_FOUND, f"persona {name!r} is not in the current scene; "
                       f"its personas: {', '.join(available) or 'none'}")


class Priority(enum.IntEnum):
    """Lower runs first. Interactive chat outranks background work such as images.

    The queue orders by the number alone, so a new class is a new member with its own number;
    ``engine.senders`` rules may put a sender's requests in any class by name.
    """

    AUDIO = -1  # speech in and out: a short utterance never waits behind a long answer
    HIGH = 0
    NORMAL = 1
    LOW = 2


@dataclass(frozen=True)
class ChatRequest:
    """A chat or plain completion: ``messages`` (rendered with the model's template) or ``prompt``."""

    model: str | None = None
    messages: Sequence[dict[str, Any]] | None = None
    prompt: str | None = None
    params: GenerationParams = field(default_factory=GenerationParams)
    priority: Priority = Priority.NORMAL
    deadline: float | None = None  # time.monotonic() after which a job still waiting is expired
    enable_thinking: bool = False
    request_id: str | None = None  # the caller's id, for logs
    # OpenAI function tools ({"type": "function", "function": {...}}) the chat template shows the
    # model; the answer's form is held by ``params.constraint`` (npu/llm/tools.py).
    tools: Sequence[dict[str, Any]] | None = None
    sender: str | None = None  # who asked (a named MQTT sender, an HTTP client): its turn in the queue
    # A raw prompt's special-token texts become the tokens: only for trusted clients that write
    # the chat format themselves. Messages never parse them (the template's markers are the tokens).
    parse_special_tokens: bool = False

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give either messages or prompt")


@dataclass(frozen=True)
class ImageRequest:
    """Text to image. Images default to low priority: a waiting chat goes first."""

    params: ImageParams
    preview: int | None = None  # a JPEG preview of this many pixels after each UNet step; None: none
    model: str | None = None
    priority: Priority = Priority.LOW
    deadline: float | None = None
    request_id: str | None = None
    sender: str | None = None  # who asked: its turn in the queue and its limits


@dataclass(frozen=True)
class SpeechRequest:
    """Text to speech: the answer is 16-bit mono PCM, streamed a sentence at a time."""

    params: SpeechParams
    model: str | None = None  # a tts model (a voice); None: the default one
    priority: Priority = Priority.AUDIO
    deadline: float | None = None
    request_id: str | None = None
    sender: str | None = None


@dataclass(frozen=True)
class TranscriptionRequest:
    """Speech to text: mono audio (any rate; the kind resamples it for its model)."""

    audio: Clip
    language: str | None = None  # ISO-639-1; None: the model's own (English for tiny.en)
    model: str | None = None  # an stt model; None: the default one
    priority: Priority = Priority.AUDIO
    deadline: float | None = None
    request_id: str | None = None
    sender: str | None = None


Request = ChatRequest | ImageRequest | SpeechRequest | TranscriptionRequest


@dataclass(frozen=True)
class Progress:
    """Prompt processing advanced (``prompt_done`` of ``prompt_tokens``); no text yet."""

    prompt_done: int
    prompt_tokens: int


@dataclass(frozen=True)
class Delta:
    """A piece of generated text, safe to show (never a partial character or stop string)."""

    text: str
    token: int | None
    logprobs: tuple[TokenLogprob, ...] = ()  # of the tokens since the previous delta (when asked)


@dataclass(frozen=True)
class ImageProgress:
    """An image job advanced: ``stage`` text, unet (``step`` of ``steps``) or vae."""

    stage: str
    step: int
    steps: int


@dataclass(frozen=True)
class ImagePreview:
    """A small JPEG of an image job's latent after UNet ``step`` of ``steps`` (``ImageRequest.preview``)."""

    data: bytes
    step: int
    steps: int
    content_type: str = "image/jpeg"


@dataclass(frozen=True)
class Place:
    """Where a job stands: ``queued`` at ``position`` (1 = next) or ``running``.

    ``eta_s`` is the expected wait until it starts (queued) or until it ends (running), from the
    engine's measured figures (``npu.engine.eta``); None until its model has finished a job.
    ``step`` of ``steps``: a running chat's tokens of ``max_tokens``, an image's UNet steps.
    Sent when the position changes, and at most about once a second otherwise.
    """

    state: Literal["queued", "running"]
    position: int | None
    eta_s: float | None
    step: int | None = None
    steps: int | None = None


@dataclass(frozen=True)
class QueueInfo:
    """The queue as ``{base}/queue`` and ``GET /v1/queue`` show it: ``eta_s`` is when a request sent
    now would start (None: not measured yet)."""

    length: int
    running: int
    queue_max: int
    eta_s: float | None
    figures: dict[str, dict[str, dict[str, float]]]  # model -> phase -> measured figures


Notice = ImagePreview | Place  # events a front door may show or drop; never a job's end


@dataclass(frozen=True)
class ImageResult:
    output: ImageOutput
    model: str
    total_ms: float
    queued_ms: float


@dataclass(frozen=True)
class ChatResult:
    text: str
    model: str
    finish_reason: FinishReason
    usage: Usage
    prompt_ms: float
    generation_ms: float
    total_ms: float
    queued_ms: float
    logprobs: tuple[TokenLogprob, ...] = ()  # every generated token's (when asked)
    # Under a constraint (``params.constraint``): whether the text is a whole answer to it; a
    # JSON answer that is not (``max_tokens`` ran out) must never be handed on as valid.
    complete: bool | None = None


@dataclass(frozen=True)
class SpeechAudio:
    """One sentence of a speech job's audio, in order (``index`` from 0)."""

    piece: Piece
    index: int


@dataclass(frozen=True)
class SpeechResult:
    """The whole utterance: ``pcm`` is every ``SpeechAudio`` piece joined."""

    pcm: bytes
    rate: int
    model: str
    audio_seconds: float
    synth_ms: float
    total_ms: float
    queued_ms: float


@dataclass(frozen=True)
class TranscriptSegment:
    """A segment of a transcription, as soon as it is decoded."""

    segment: Segment


@dataclass(frozen=True)
class TranscriptionResult:
    text: str
    segments: list[Segment]
    language: str
    audio_seconds: float
    model: str
    transcribe_ms: float
    total_ms: float
    queued_ms: float


@dataclass(frozen=True)
class Done:
    result: ChatResult | ImageResult | SpeechResult | TranscriptionResult


@dataclass(frozen=True)
class Failed:
    error: EngineError


JobEvent = Progress | Delta | ImageProgress | SpeechAudio | TranscriptSegment | Done | Failed | Notice
Sink = Callable[[JobEvent], None]
JobStatus = Literal["queued", "running", "done", "failed"]

_ids = itertools.count(1)


class JobHandle:
    """A submitted job: its engine id, its status, and a way to cancel it from any thread."""

    def __init__(self, request: Request, sink: Sink) -> None:
        self.id = f"job-{next(_ids)}"
        self.request = request
        self.sink = sink
        self.submitted = time.monotonic()
        self.status: JobStatus = "queued"
        self._cancelled = threading.Event()
        self._finished = threading.Event()
        self.on_cancel: Callable[[JobHandle], None] | None = None  # the engine drops it from the queue
        self._notices = threading.RLock()  # orders notices before the terminal event

    def cancel(self) -> None:
        """Stop this job: a waiting one leaves the queue at once, a running one at its next step.

        Either way it ends ``Failed(cancelled)``; cancelling a finished job does nothing.
        """
        if self._cancelled.is_set() or self._finished.is_set():
            return
        self._cancelled.set()
        if self.on_cancel is not None:
            self.on_cancel(self)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the terminal event was delivered (for tests and the CLI)."""
        return self._finished.wait(timeout)

    def finish(self, event: Done | Failed) -> None:
        """Deliver the terminal event exactly once (called by the engine)."""
        with self._notices:  # a notice being delivered now goes first; none can follow
            if self._finished.is_set():
                return
            self.status = "done" if isinstance(event, Done) else "failed"
            try:
                self.sink(event)
            finally:
                self._finished.set()

    def notify(self, notice: Notice) -> bool:
        """Deliver a notice (its place, a preview) unless the job has ended: never after its end.
        False when it had ended."""
        with self._notices:
            if self._finished.is_set() or self.status in ("done", "failed"):
                return False
            self.sink(notice)
            return True


@dataclass(frozen=True)
class ModelInfo:
    id: str
    kind: str  # the job kind that runs it: chat, image, tts, stt (``npu.engine.kinds``)
    loaded: bool
    backend: str | None
    context_length: int | None
    max_prompt_tokens: int | None
    sizes: list[str] | None = None  # image models: "WxH" they make
    steps: list[int] | None = None  # image models: step counts they run
    sample_rate: int | None = None  # tts models: the rate of their audio; stt: the rate they read
    aliases: list[str] | None = None  # more names it answers to (``models[].aliases``)
    languages: list[str] | None = None  # stt models: the language codes they take (None: any)


@dataclass(frozen=True)
class ImageStyle:
    """A persona's look: words around every prompt, a negative prompt and steps when none is given."""

    prefix: str = ""
    suffix: str = ""
    negative_prompt: str | None = None
    steps: int | None = None


@dataclass(frozen=True)
class Persona:
    """A character of the installation (config ``personas:``): its model, its system prompt, and the
    sampling defaults a request that names it gets for the fields it leaves out.

    Both front doors apply it the same way, through ``messages`` and ``params``; its system prompt
    is the prefix the engine keeps warm on its model.
    """

    name: str
    system: str
    model: str | None = None  # a chat model id; None: the default chat model
    defaults: dict[str, Any] = field(default_factory=dict)  # GenerationParams fields (max_tokens, stop...)
    image: ImageStyle | None = None

    def messages(self, messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """The conversation with the persona's system prompt first. A system message the client sent
        follows it in the same message, so the persona's words stay the (warm) start of the prompt."""
        rest = list(messages)
        system = self.system
        if rest and rest[0].get("role") == "system" and isinstance(rest[0].get("content"), str):
            system = f"{system}\n\n{rest.pop(0)['content']}"
        return [{"role": "system", "content": system}, *rest]

    def params(self, given: dict[str, Any]) -> dict[str, Any]:
        """The persona's defaults overlaid with the fields the request set itself."""
        return {**self.defaults, **given}

    def image_prompt(self, prompt: str) -> str:
        style = self.image or ImageStyle()
        return " ".join(part for part in (style.prefix, prompt, style.suffix) if part)


@dataclass(frozen=True)
class EngineState:
    """What ``{base}/state`` and ``/health`` show."""

    state: Literal["loading", "idle", "busy", "paused", "recovering", "failed", "stopped"]
    queue_depth: int
    running: int
    queue_max: int
    reason: str | None = None


@dataclass(frozen=True)
class DeviceSnapshot:
    """One device as ``/health``, telemetry and the health job see it, read under one lock hold."""

    device_id: int
    thermal: str  # the thermal level's label: normal, throttle, pause
    recovering: bool
    failed: str | None  # why the device was given up on; None while it works
    loaded: bool  # its worker finished loading the models (successfully or not)
    reading: DeviceReading | None = None  # the health job's latest; None until it first ran


@dataclass(frozen=True)
class JobInfo:
    """One waiting or running job, as the console's queue lists it (``EngineClient.jobs``)."""

    id: str
    kind: str  # the job kind: chat, image, tts, stt
    model: str
    sender: str | None
    state: Literal["queued", "running"]
    position: int | None  # 1 = the next a worker takes; None while running
    waited_s: float  # since it was submitted
    step: int | None = None  # a running job's progress, where its kind tells it
    steps: int | None = None
    eta_s: float | None = None  # its last place's estimate: until it starts (queued) or ends (running)


StateListener = Callable[[EngineState], None]
EventListener = Callable[[str, dict[str, Any]], None]


class EngineClient(Protocol):
    """What a front door may ask of the engine; both ``handlers/`` and ``bridge_http/`` type
    against this, so the engine's insides can change without touching them."""

    @property
    def default_chat(self) -> str | None: ...
    @property
    def jobs_done(self) -> int: ...
    @property
    def jobs_failed(self) -> int: ...
    @property
    def registry(self) -> CollectorRegistry: ...

    def submit(self, request: Request, sink: Sink) -> JobHandle: ...
    def cancel(self, request_id: str) -> int: ...
    def pause(self, reason: str = ...) -> None: ...
    def resume(self) -> None: ...
    def reload(self, model_id: str | None = None, timeout: float | None = None) -> None: ...
    def restart(self, reason: str = ...) -> list[int]: ...
    def models(self) -> list[ModelInfo]: ...
    def state(self) -> EngineState: ...
    def devices(self) -> list[DeviceSnapshot]: ...
    def senders(self) -> dict[str, dict[str, Any]]: ...
    def jobs(self) -> list[JobInfo]: ...
    def personas(self) -> list[Persona]: ...
    def persona(self, name: str | None) -> Persona | None: ...
    def add_state_listener(self, listener: StateListener) -> None: ...
    def add_event_listener(self, listener: EventListener) -> None: ...
    def queue(self) -> QueueInfo: ...
