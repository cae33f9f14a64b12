"""Kokoro in AXERA's layout (kokoro.axera) on the strict simulated card runtime.

The three parts and the harmonic model are tiny graphs with Kokoro's IO (names, dtypes, the
96-token chunk and its 192 frames; ``npu/speech/axera_kokoro.py`` says where each comes from)
whose numbers make the audio depend on what the runner feeds: part 1 gives every token as many
frames as the style row's first value says and hands the token ids on as ``d``; part 2 turns the
aligned ids into the pitch; the harmonic model says whether it heard a pitch; part 3's spectrum is
a tone at one bin only when it did. So a runner that picks the wrong style row, aligns wrongly,
drops the harmonic source or trims wrongly makes audio of the wrong length or silence.
PyAXEngine's checks (every input of the declared name, shape and dtype) are the fake's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import fake_axengine as fa
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from npu.sentences import split_sentences
from npu.speech.axera_kokoro import HOP, N_FFT, RATE, AxKokoroRunner, istft
from npu.speech.voices import load_voice, voice_backend

L, F, D, C, A = 96, 192, 50, 8, 4
T = 12 * F + 1  # spectrum frames: 60 samples a frame here (600 on the real model)
SAMPLES_PER_FRAME = HOP * (T - 1) // F
BIN = 4  # the tone's bin, 4 * 24000 / 20 = 4800 Hz: a whole turn of phase a hop, so a constant phase
VOCAB = {ch: i + 1 for i, ch in enumerate(" .,!?abcdefhijklmnopstuvwzæðŋɑɔəɛɜɡɪɹʃʊʌʒʤʧθˈˌːAIOWY")}


def save(graph: onnx.GraphProto, path: Path, ins: list[tuple[str, str, list[int]]] | None = None,
         outs: list[tuple[str, str, list[int]]] | None = None) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    if ins is not None and outs is not None:
        entry = model.metadata_props.add()
        entry.key = fa.GROUPS_KEY
        entry.value = json.dumps([{"inputs": [list(i) for i in ins], "outputs": [list(o) for o in outs]}])
    onnx.save(model, str(path))


def info(name: str, dtype: str, shape: list[int]) -> onnx.ValueInfoProto:
    kinds = {"float32": TensorProto.FLOAT, "int32": TensorProto.INT32, "uint8": TensorProto.UINT8}
    return helper.make_tensor_value_info(name, kinds[dtype], shape)


def make_kokoro(dest: Path, *, drop_input: str | None = None) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    # part 1: duration[i, n] = +30 for n < k (sigmoid 1), else -30, k = ref_s[0, 0]; d[i, :] = input_ids[i]
    ins1 = [("input_ids", "int32", [1, L]), ("ref_s", "float32", [1, 256]), ("text_mask", "uint8", [1, L])]
    outs1 = [("duration", "float32", [1, L, D]), ("d", "float32", [1, L, C])]
    nodes1 = [
        helper.make_node("Gather", ["ref_s", "zero"], ["k2"], axis=1),
        helper.make_node("Reshape", ["k2", "scalar"], ["k"]),
        helper.make_node("Less", ["range_d", "k"], ["below"]),
        helper.make_node("Where", ["below", "plus", "minus"], ["row"]),
        helper.make_node("Expand", ["row", "dur_shape"], ["duration"]),
        helper.make_node("Cast", ["input_ids"], ["ids_f"], to=f32),
        helper.make_node("Unsqueeze", ["ids_f", "axis2"], ["ids_3"]),
        helper.make_node("Expand", ["ids_3", "d_shape"], ["d"]),
    ]
    init1 = [helper.make_tensor("zero", i64, [], [0]), helper.make_tensor("scalar", i64, [0], []),
             helper.make_tensor("range_d", f32, [D], list(range(D))),
             helper.make_tensor("plus", f32, [], [30.0]),
             helper.make_tensor("minus", f32, [], [-30.0]),
             helper.make_tensor("dur_shape", i64, [3], [1, L, D]), helper.make_tensor("axis2", i64, [1], [2]),
             helper.make_tensor("d_shape", i64, [3], [1, L, C])]
    graph1 = helper.make_graph(nodes1, "part1", [info(*i) for i in ins1], [info(*o) for o in outs1], init1)
    declared = [i for i in ins1 if i[0] != drop_input]  # a compiled part that lacks an input
    save(graph1, dest / "kokoro_part1_96.axmodel", declared, outs1)
    # part 2: F0 = each frame's token id (en's row 0), twice; asr = whether a token owns the frame
    ins2 = [("en", "float32", [1, C, F]), ("ref_s", "float32", [1, 256]), ("input_ids", "int32", [1, L]),
            ("text_mask", "float32", [1, L]), ("pred_aln_trg", "float32", [1, L, F])]
    outs2 = [("F0_pred", "float32", [1, 2 * F]), ("N_pred", "float32", [1, 2 * F]),
             ("asr", "float32", [1, A, F])]
    nodes2 = [
        helper.make_node("Gather", ["en", "zero"], ["e0"], axis=1),
        helper.make_node("Unsqueeze", ["e0", "axis2"], ["e3"]),
        helper.make_node("Concat", ["e3", "e3"], ["e_twice"], axis=2),
        helper.make_node("Reshape", ["e_twice", "f0_shape"], ["F0_pred"]),
        helper.make_node("Identity", ["F0_pred"], ["N_pred"]),
        helper.make_node("ReduceSum", ["pred_aln_trg", "axis1"], ["owned"], keepdims=1),
        helper.make_node("Expand", ["owned", "asr_shape"], ["asr"]),
    ]
    init2 = [helper.make_tensor("zero", i64, [], [0]), helper.make_tensor("axis2", i64, [1], [2]),
             helper.make_tensor("axis1", i64, [1], [1]), helper.make_tensor("f0_shape", i64, [2], [1, 2 * F]),
             helper.make_tensor("asr_shape", i64, [3], [1, A, F])]
    graph2 = helper.make_graph(nodes2, "part2", [info(*i) for i in ins2], [info(*o) for o in outs2], init2)
    save(graph2, dest / "kokoro_part2_96.axmodel", ins2, outs2)
    # the harmonic model (plain ONNX, CPU): har = 1 everywhere when a pitch was heard, else 0
    nodes4 = [helper.make_node("ReduceMax", ["F0_pred"], ["peak"], keepdims=0),
              helper.make_node("Greater", ["peak", "zero_f"], ["heard"]),
              helper.make_node("Cast", ["heard"], ["heard_f"], to=f32),
              helper.make_node("Expand", ["heard_f", "har_shape"], ["har"])]
    init4 = [helper.make_tensor("zero_f", f32, [], [0.0]),
             helper.make_tensor("har_shape", i64, [3], [1, 22, T])]
    graph4 = helper.make_graph(nodes4, "har", [info("F0_pred", "float32", [1, 2 * F])],
                               [info("har", "float32", [1, 22, T])], init4)
    save(graph4, dest / "model4_har_sim.onnx")
    # part 3: x = har * (a tone at BIN: log magnitude 0 there, -30 elsewhere; raw phase 0) + (1 - har) * -30
    tone = np.full((22, T), -30.0, np.float32)
    tone[BIN] = 0.0
    tone[11:] = 0.0
    ins3 = [("asr", "float32", [1, A, F]), ("F0_pred", "float32", [1, 2 * F]),
            ("N_pred", "float32", [1, 2 * F]), ("ref_s", "float32", [1, 256]), ("har", "float32", [1, 22, T])]
    outs3 = [("x", "float32", [1, 22, T])]
    nodes3 = [helper.make_node("Sub", ["tone", "quiet"], ["lift"]),
              helper.make_node("Mul", ["har", "lift"], ["lifted"]),
              helper.make_node("Add", ["lifted", "quiet"], ["x"])]
    quiet = np.full((22, T), -30.0, np.float32)
    quiet[11:] = 0.0
    init3 = [helper.make_tensor("tone", f32, [1, 22, T], tone.flatten().tolist()),
             helper.make_tensor("quiet", f32, [1, 22, T], quiet.flatten().tolist())]
    graph3 = helper.make_graph(nodes3, "part3", [info(*i) for i in ins3], [info(*o) for o in outs3], init3)
    save(graph3, dest / "kokoro_part3_96.axmodel", ins3, outs3)
    (dest / "config.json").write_text(json.dumps({"vocab": VOCAB, "n_token": 178}))
    pack = np.zeros((510, 1, 256), np.float32)
    pack[:, 0, 0] = 1.0 + (np.arange(510) % 2)  # odd phoneme counts: 2 frames a token, even: 1
    np.save(dest / "af_heart.npy", pack)
    return dest


@pytest.fixture
def card(monkeypatch: pytest.MonkeyPatch) -> fa.Record:
    module = fa.make_module()
    monkeypatch.setitem(sys.modules, "axengine", module)
    return module.record  # type: ignore[no-any-return]


def samples_of(ids: list[int], speed: float = 1.0) -> int:
    """What the graphs make of one chunk: every id (the two 0s too) gets the frames its style row
    says (odd phoneme counts 2, even 1; over the speed, at least 1), 60 samples a frame."""
    per_token = max(1, round((1 + (len(ids) - 2) % 2) / speed))
    return len(ids) * per_token * SAMPLES_PER_FRAME


def expected_samples(runner: AxKokoroRunner, text: str, speed: float = 1.0) -> int:
    return samples_of(runner.token_ids(text), speed)


def test_a_sentence_is_spoken_with_its_durations_style_and_tone(tmp_path: Path, card: fa.Record) -> None:
    folder = make_kokoro(tmp_path / "kokoro")
    backend, why = voice_backend(folder, "axengine")
    assert backend == "axengine" and "Kokoro" in why
    runner = load_voice(folder, "axengine")
    assert isinstance(runner, AxKokoroRunner) and (runner.seq_len, runner.frames) == (L, F)
    short = "Hello there."  # well under 32 ids: fed twice, the second half dropped
    ids = runner.token_ids(short)
    assert ids[0] == ids[-1] == 0 and len(ids) <= 32 and ids[-2] == VOCAB["."]
    pieces = list(runner.speak_steps(short))
    assert len(pieces) == 1 and pieces[0].rate == RATE == 24000
    samples = np.frombuffer(pieces[0].pcm, "<i2").astype(np.float32) / 32768
    assert len(samples) == expected_samples(runner, short)
    spectrum = np.abs(np.fft.rfft(samples[: len(samples) // 2]))
    assert np.argmax(spectrum) * RATE / (len(samples) // 2) == pytest.approx(BIN * RATE / N_FFT, rel=0.05)
    assert np.abs(samples[-10:]).max() < np.abs(samples).max() / 4, "the fade-out"

    longer = "The quick brown fox jumps over the lazy dog near the quiet river bank."
    assert 32 < len(runner.token_ids(longer)) <= L
    (piece,) = runner.speak_steps(longer)
    assert len(piece.pcm) // 2 == expected_samples(runner, longer)
    (fast,) = runner.speak_steps(longer, speed=2.0)
    assert len(fast.pcm) // 2 == expected_samples(runner, longer, 2.0)

    before = sum(1 for name, _ in card.runs if name.startswith("kokoro_part1"))
    two = list(runner.speak_steps("One sentence here. " + "And a second one that is long enough to count."))
    assert len(two) == 2 and two[1].text.startswith("And")
    pause = int(RATE * 0.05)
    assert len(two[1].pcm) // 2 == pause + expected_samples(runner, two[1].text)
    runs = sum(1 for name, _ in card.runs if name.startswith("kokoro_part1"))
    assert runs - before == 2, "one run of each part a sentence"
    very_long = "The gallery opens at nine every morning and closes at six every evening, except on " \
                "the longest summer days when it stays open late."
    assert len(split_sentences(very_long)) == 1 and len(runner.token_ids(very_long)) > L
    (piece,) = runner.speak_steps(very_long)
    halves = sum(1 for name, _ in card.runs if name.startswith("kokoro_part1")) - runs
    assert halves == 2, "a sentence over 96 ids is spoken in halves cut at its middle word"
    chunks = runner.chunks(very_long)
    assert len(chunks) == 2 and all(len(c) < L for c in chunks)
    assert len(piece.pcm) // 2 == sum(samples_of(c) for c in chunks)
    runner.close()


def test_a_part_without_kokoros_inputs_is_refused_at_load(tmp_path: Path, card: fa.Record) -> None:
    folder = make_kokoro(tmp_path / "kokoro", drop_input="ref_s")
    with pytest.raises(ValueError, match="kokoro_part1_96 takes input_ids, text_mask, not input_ids, ref_s"):
        load_voice(folder, "axengine")


def test_without_the_card_kokoro_says_where_it_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from npu.runtime.base import BackendUnavailableError

    folder = make_kokoro(tmp_path / "kokoro")
    monkeypatch.setitem(sys.modules, "axengine", None)
    monkeypatch.setattr("npu.runtime.factory.axcl_available", lambda: False)
    monkeypatch.setattr("npu.runtime.factory.axengine_available", lambda: False)
    with pytest.raises(BackendUnavailableError, match="AXERA's Kokoro, compiled for the card"):
        voice_backend(folder, "auto")
    with pytest.raises(ValueError, match="runs on the card"):
        voice_backend(folder, "onnx")


def test_the_inverse_stft_puts_a_bin_at_its_frequency() -> None:
    frames = 401
    log_mag = np.full((11, frames), -30.0)
    log_mag[BIN] = 0.0  # magnitude 1 at 4800 Hz, phase 0 in every frame
    audio = istft(log_mag, np.zeros((11, frames)))
    assert len(audio) == HOP * (frames - 1)
    spectrum = np.abs(np.fft.rfft(audio))
    assert np.argmax(spectrum) * RATE / len(audio) == pytest.approx(BIN * RATE / N_FFT, rel=0.01)
    # each frame is a cosine of amplitude 2 / n_fft; torch.istft's overlap-add divides the Hann
    # windows' sum (2 at this hop) by their squares' sum (1.5)
    assert np.abs(audio[20:-20]).max() == pytest.approx(2 / N_FFT * 2 / 1.5, rel=0.01)


def test_the_appliance_speaks_with_kokoro_on_the_card(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    mqtt_broker, demo_bundle_fp32: Path) -> None:  # type: ignore[no-untyped-def]
    """OpenAI's speech route through the engine to Kokoro on the simulated card: a 24 kHz WAV."""
    import io
    import wave

    import openai
    from mqtt_client import write_config

    from appliance.app import Appliance
    from appliance.config import load_config

    monkeypatch.setitem(sys.modules, "axengine", fa.make_module())
    folder = make_kokoro(tmp_path / "kokoro")
    path = write_config(tmp_path, mqtt_broker.port, "kokorotest", demo_bundle_fp32,
                        models=[{"id": "kokoro", "kind": "tts", "path": str(folder), "runtime": "axengine"}],
                        http={"enabled": True, "host": "127.0.0.1", "port": 0}, journal={"enabled": False})
    app = Appliance(load_config(path, env={}))
    app.start()
    try:
        assert app.engine.wait_loaded(60) and app.http is not None
        assert [(m.id, m.backend) for m in app.engine.models()] == [("kokoro", "axengine")]
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{app.http.bound_port}/v1", api_key="none")
        wav = client.audio.speech.create(model="tts-1", voice="alloy", input="Hello there.",
                                         response_format="wav").content
        with wave.open(io.BytesIO(wav)) as w:
            assert w.getframerate() == 24000
            frames = w.getnframes()
        runner = AxKokoroRunner(folder, "axengine")
        assert frames == expected_samples(runner, "Hello there.")
        runner.close()
    finally:
        app.stop()
