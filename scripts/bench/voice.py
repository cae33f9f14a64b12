"""Speech on this machine, through the engine the front doors use.

- TTS: the real-time factor (synthesis time / audio duration) of ``--runs`` utterances of a
  few sentences with the demo voice, and the time to the first sentence's audio.
- STT: the real-time factor of Whisper tiny.en transcribing that speech (greedy, int8, 2 threads).
- Chat while speech runs: the demo model's tokens per second decoding alone, then with a speech
  job arriving every second (what a talking installation does), greedy, same prompt.

- ``--fallbacks``: also the fallbacks' real-time factors, espeak-ng speaking the utterance and
  PocketSphinx transcribing the Piper voice's (espeak-ng's is one PocketSphinx does not understand).

Run: ./scripts/bench_voice [--runs 5] [--fallbacks]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from npu.engine.api import (  # noqa: E402
    ChatRequest,
    ChatResult,
    Done,
    JobEvent,
    SpeechAudio,
    SpeechRequest,
    SpeechResult,
    TranscriptionRequest,
    TranscriptionResult,
)
from npu.engine.config import ModelSpec  # noqa: E402
from npu.engine.engine import Engine  # noqa: E402
from npu.llm.params import GenerationParams  # noqa: E402
from npu.speech.audio import pcm16_clip  # noqa: E402
from npu.speech.params import SpeechParams  # noqa: E402

TEXT = ("Welcome to the gallery. The paintings in this room were made by the sea. "
        "Please stay a while, and listen to the waves.")


def run(engine: Engine, request: object) -> tuple[list[tuple[float, JobEvent]], float]:
    events: list[tuple[float, JobEvent]] = []
    start = time.monotonic()
    handle = engine.submit(request, lambda e: events.append((time.monotonic(), e)))  # type: ignore[arg-type]
    handle.wait(300)
    return events, start


def chat_speed(engine: Engine, speech_every: float | None) -> float:
    stop = threading.Event()

    def talk() -> None:
        while not stop.wait(speech_every or 1.0):
            engine.submit(SpeechRequest(SpeechParams("The tide is coming in.")), lambda e: None)

    talker = threading.Thread(target=talk) if speech_every else None
    if talker:
        talker.start()
    messages = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
    greedy = GenerationParams(max_tokens=200, temperature=0)
    events, _ = run(engine, ChatRequest(messages=messages, params=greedy))
    stop.set()
    if talker:
        talker.join()
    result = events[-1][1]
    assert isinstance(result, Done) and isinstance(result.result, ChatResult)
    r = result.result
    return r.usage.completion_tokens / (r.generation_ms / 1e3)


def fallbacks(engine: Engine, runs: int, piper: SpeechResult) -> None:
    """espeak-ng's real-time factor and first sentence, and PocketSphinx's on the Piper speech."""
    tts_rtf, first, stt_rtf = [], [], []
    for _ in range(runs):
        events, start = run(engine, SpeechRequest(SpeechParams(TEXT), model="espeak"))
        done = events[-1][1]
        assert isinstance(done, Done) and isinstance(done.result, SpeechResult)
        tts_rtf.append(done.result.synth_ms / 1e3 / done.result.audio_seconds)
        first.append(next(t for t, e in events if isinstance(e, SpeechAudio)) - start)
        events, _ = run(engine, TranscriptionRequest(pcm16_clip(piper.pcm, piper.rate), model="sphinx"))
        heard = events[-1][1]
        assert isinstance(heard, Done) and isinstance(heard.result, TranscriptionResult)
        stt_rtf.append(heard.result.transcribe_ms / 1e3 / heard.result.audio_seconds)
    print(f"TTS  espeak-ng (fallback): real-time factor median {statistics.median(tts_rtf):.3f} "
          f"(min {min(tts_rtf):.3f}, max {max(tts_rtf):.3f}); first sentence's audio after "
          f"{statistics.median(first) * 1e3:.0f} ms; {done.result.audio_seconds:.2f} s of audio")
    print(f"STT  PocketSphinx en-US (fallback): real-time factor median {statistics.median(stt_rtf):.3f} "
          f"(min {min(stt_rtf):.3f}, max {max(stt_rtf):.3f}); heard: {heard.result.text!r}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--fallbacks", action="store_true", help="espeak-ng and PocketSphinx too")
    args = parser.parse_args()
    models = ROOT / "models"
    engine = Engine([ModelSpec("demo", "chat", models / "smollm2-135m-instruct", runtime="onnx"),
                     ModelSpec("joe-us-medium", "tts", models / "joe-us-medium"),
                     ModelSpec("whisper-tiny-en", "stt", models / "whisper-tiny-en")]
                    + ([ModelSpec("espeak", "tts", models / "joe-us-medium", runtime="espeak-ng"),
                        ModelSpec("sphinx", "stt", models / "whisper-tiny-en", runtime="pocketsphinx")]
                       if args.fallbacks else []))
    engine.start()
    try:
        tts_rtf, first, stt_rtf = [], [], []
        for _ in range(args.runs):
            events, start = run(engine, SpeechRequest(SpeechParams(TEXT)))
            done = events[-1][1]
            assert isinstance(done, Done) and isinstance(done.result, SpeechResult)
            speech = done.result
            tts_rtf.append(speech.synth_ms / 1e3 / speech.audio_seconds)
            first.append(next(t for t, e in events if isinstance(e, SpeechAudio)) - start)
            events, _ = run(engine, TranscriptionRequest(pcm16_clip(speech.pcm, speech.rate)))
            done = events[-1][1]
            assert isinstance(done, Done) and isinstance(done.result, TranscriptionResult)
            stt_rtf.append(done.result.transcribe_ms / 1e3 / done.result.audio_seconds)
        print(f"utterance: {len(TEXT)} characters, {speech.audio_seconds:.2f} s of audio at {speech.rate} Hz")
        print(f"TTS  Piper en_US-joe-medium: real-time factor median {statistics.median(tts_rtf):.3f} "
              f"(min {min(tts_rtf):.3f}, max {max(tts_rtf):.3f}); first sentence's audio after "
              f"{statistics.median(first) * 1e3:.0f} ms")
        print("STT  Whisper tiny.en (CTranslate2 int8): real-time factor median "
              f"{statistics.median(stt_rtf):.3f} "
              f"(min {min(stt_rtf):.3f}, max {max(stt_rtf):.3f})")
        if args.fallbacks:
            fallbacks(engine, args.runs, speech)
        alone = statistics.median(chat_speed(engine, None) for _ in range(2))
        talking = statistics.median(chat_speed(engine, 1.0) for _ in range(2))
        print(f"chat decode, demo model: {alone:.1f} tokens/s alone, {talking:.1f} tokens/s with a sentence "
              f"spoken every second ({talking / alone * 100:.0f}% kept)")
    finally:
        engine.stop()


if __name__ == "__main__":
    main()
