"""Whisper in AXERA's layout (ax_asr_api) on the strict simulated card runtime.

The encoder and decoder here are tiny graphs with AXERA's Whisper IO (``npu/speech/axera_whisper.py``
says rule by rule where each comes from) whose numbers make the decoder's answer depend on what
the runner feeds: the next token is read from a script at the number of cache rows the mask
shows and the cache holds, so a runner that forgets to write the cache, opens the mask wrongly
or feeds a wrong offset reads a different word; the encoder's cross attention carries whether the
audio held sound, so a runner that drops it hears silence. PyAXEngine's own checks (every input
of the declared shape and dtype, all outputs at once) are the fake's (tests/fake_axengine.py).
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import fake_axengine as fa
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from npu.speech.axera_whisper import FRAMES, AxWhisperRunner
from npu.speech.transcribers import load_transcriber

N_MELS, LAYERS, CTX, STATE, AUDIO_CTX = 80, 2, 12, 16, 4
WORDS = ["<unk>", "<sot>", "<en>", "<de>", "<transcribe>", "<notimestamps>", "<eot>",
         "Hello", " art", " lovers", "!"]
SOT, EN, DE, TRANSCRIBE, NO_TS, EOT = 1, 2, 3, 4, 5, 6
# the token answered when the cache holds n visible rows: the four start tokens, then the words
SCRIPT = [0, 0, 0, 7, 8, 9, 10, EOT] + [EOT] * (CTX - 8)


def groups(inputs: list[tuple[str, str, list[int]]], outputs: list[tuple[str, str, list[int]]]) -> str:
    return json.dumps([{"inputs": [list(i) for i in inputs], "outputs": [list(o) for o in outputs]}])


def save(graph: onnx.GraphProto, declared: str, path: Path) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    entry = model.metadata_props.add()
    entry.key, entry.value = fa.GROUPS_KEY, declared
    onnx.save(model, str(path))


def make_folder(dest: Path) -> Path:
    """``tiny-encoder.axmodel``, ``tiny-decoder.axmodel``, ``tiny-tokens.txt``, ``tiny_config.json``."""
    dest.mkdir(parents=True, exist_ok=True)
    f32, i32 = TensorProto.FLOAT, TensorProto.INT32
    # encoder: cross_k = cross_v = max(mel) everywhere (sound: > 0; AXERA's silence: -1.5)
    enc = helper.make_graph(
        [helper.make_node("ReduceMax", ["mel"], ["peak"], keepdims=0),
         helper.make_node("Expand", ["peak", "kv_shape"], ["cross_k"]),
         helper.make_node("Identity", ["cross_k"], ["cross_v"])],
        "encoder", [helper.make_tensor_value_info("mel", f32, [1, N_MELS, FRAMES])],
        [helper.make_tensor_value_info(n, f32, [LAYERS, AUDIO_CTX, STATE]) for n in ("cross_k", "cross_v")],
        [helper.make_tensor("kv_shape", TensorProto.INT64, [3], [LAYERS, AUDIO_CTX, STATE])])
    save(enc, groups([("mel", "float32", [1, N_MELS, FRAMES])],
                     [("cross_k", "float32", [LAYERS, AUDIO_CTX, STATE]),
                      ("cross_v", "float32", [LAYERS, AUDIO_CTX, STATE])]), dest / "tiny-encoder.axmodel")
    # decoder: rows = sum over visible positions of "this row was written"; next = SCRIPT[rows]
    # when the audio had sound, else eot; the new K/V rows are the token's number + 1 (never 0)
    vocab = len(WORDS)
    nodes = [
        helper.make_node("Cast", ["mask"], ["mask_f"], to=f32),
        helper.make_node("Sub", ["one", "mask_f"], ["visible"]),                       # [CTX]
        helper.make_node("Gather", ["self_k", "zero_i"], ["layer0"], axis=0),          # [CTX, STATE]
        helper.make_node("Abs", ["layer0"], ["abs0"]),
        helper.make_node("ReduceMax", ["abs0", "last_axis"], ["row_max"], keepdims=0),  # [CTX]
        helper.make_node("Greater", ["row_max", "zero_f"], ["written_b"]),
        helper.make_node("Cast", ["written_b"], ["written"], to=f32),
        helper.make_node("Mul", ["visible", "written"], ["seen"]),
        helper.make_node("ReduceSum", ["seen"], ["rows_f"], keepdims=0),
        helper.make_node("Cast", ["rows_f"], ["rows"], to=TensorProto.INT64),
        helper.make_node("Gather", ["script", "rows"], ["scripted"], axis=0),
        helper.make_node("ReduceMax", ["cross_k"], ["sound"], keepdims=0),
        helper.make_node("Greater", ["sound", "zero_f"], ["heard"]),
        helper.make_node("Where", ["heard", "scripted", "eot"], ["next"]),
        helper.make_node("Reshape", ["next", "one_shape"], ["next_1"]),
        helper.make_node("OneHot", ["next_1", "depth", "onehot_values"], ["onehot"], axis=-1),
        helper.make_node("Reshape", ["onehot", "vocab_shape"], ["logits"]),
        helper.make_node("Cast", ["tokens"], ["token_f"], to=f32),
        helper.make_node("Add", ["token_f", "one"], ["row_value"]),
        helper.make_node("Expand", ["row_value", "row_shape"], ["this_self_k"]),
        helper.make_node("Identity", ["this_self_k"], ["this_self_v"]),
    ]
    init = [helper.make_tensor("one", f32, [], [1.0]), helper.make_tensor("zero_f", f32, [], [0.0]),
            helper.make_tensor("zero_i", TensorProto.INT64, [], [0]),
            helper.make_tensor("last_axis", TensorProto.INT64, [1], [-1]),
            helper.make_tensor("script", TensorProto.INT64, [len(SCRIPT)], SCRIPT),
            helper.make_tensor("eot", TensorProto.INT64, [], [EOT]),
            helper.make_tensor("depth", TensorProto.INT64, [], [vocab]),
            helper.make_tensor("onehot_values", f32, [2], [0.0, 1.0]),
            helper.make_tensor("row_shape", TensorProto.INT64, [3], [LAYERS, 1, STATE]),
            helper.make_tensor("one_shape", TensorProto.INT64, [1], [1]),
            helper.make_tensor("vocab_shape", TensorProto.INT64, [1], [vocab])]
    ins = [("tokens", "int32", [1]), ("self_k", "float32", [LAYERS, CTX, STATE]),
           ("self_v", "float32", [LAYERS, CTX, STATE]),
           ("cross_k", "float32", [LAYERS, AUDIO_CTX, STATE]),
           ("cross_v", "float32", [LAYERS, AUDIO_CTX, STATE]),
           ("offset", "int32", [1]), ("mask", "int32", [CTX])]
    outs = [("logits", "float32", [vocab]), ("this_self_k", "float32", [LAYERS, 1, STATE]),
            ("this_self_v", "float32", [LAYERS, 1, STATE])]
    kinds = {"int32": i32, "float32": f32}
    dec = helper.make_graph(
        nodes, "decoder", [helper.make_tensor_value_info(n, kinds[d], s) for n, d, s in ins],
        [helper.make_tensor_value_info("logits", f32, [vocab])]
        + [helper.make_tensor_value_info(n, f32, s) for n, _, s in outs[1:]], init)
    dec.node.append(helper.make_node("Identity", ["offset"], ["offset_unused"]))
    dec.node.append(helper.make_node("Identity", ["cross_v"], ["cross_v_unused"]))
    save(dec, groups(ins, outs), dest / "tiny-decoder.axmodel")
    tokens = "\n".join(f"{base64.b64encode(w.encode()).decode()} {i}" for i, w in enumerate(WORDS))
    (dest / "tiny-tokens.txt").write_text(tokens + "\n")
    (dest / "tiny_config.json").write_text(json.dumps({
        "n_mels": N_MELS, "n_vocab": vocab, "n_text_layer": LAYERS, "n_text_ctx": CTX, "n_text_state": STATE,
        "sot": SOT, "eot": EOT, "no_timestamps": NO_TS, "transcribe": TRANSCRIBE, "translate": 0,
        "all_language_tokens": f"{EN},{DE}", "all_language_codes": "en,de"}))
    return dest


@pytest.fixture
def card(monkeypatch: pytest.MonkeyPatch) -> fa.Card:
    card = fa.Card()
    monkeypatch.setitem(sys.modules, "axengine", fa.make_module(card=card))
    return card


def test_the_decoder_loop_reads_the_words_the_card_answers(tmp_path: Path, card: fa.Card) -> None:
    folder = make_folder(tmp_path / "whisper")
    model = load_transcriber(folder, "axengine")
    assert isinstance(model, AxWhisperRunner) and model.backend == "axengine"
    tone = np.sin(np.arange(16000 * 2) / 16000 * 2 * np.pi * 440).astype(np.float32) * 0.3
    segments = list(model.transcribe_steps(tone, "en"))
    assert [s.text for s in segments] == ["Hello art lovers!"]
    assert (segments[0].start, segments[0].end) == (0.0, 2.0)
    silence = np.zeros(16000, np.float32)
    assert [s.text for s in model.transcribe_steps(silence)] == [""], "silence: eot at once"
    long = np.concatenate([tone] * 20)  # 40 s: two 30-second windows, a segment each
    assert [s.text for s in model.transcribe_steps(long)] == ["Hello art lovers!"] * 2
    with pytest.raises(ValueError, match="does not know language 'fr'"):
        model.check_language("fr")
    model.close()
    assert card.cmm_used == 0, "closing unloads both models from the card"


def test_a_decoder_with_other_shapes_is_refused_at_load(tmp_path: Path, card: fa.Card) -> None:
    folder = make_folder(tmp_path / "whisper")
    config = json.loads((folder / "tiny_config.json").read_text())
    (folder / "tiny_config.json").write_text(json.dumps({**config, "n_text_ctx": CTX * 2}))
    with pytest.raises(ValueError, match=r"decoder input 1 \(self_k\) is \(2, 12, 16\), not \(2, 24, 16\)"):
        load_transcriber(folder, "axengine")


# --- SenseVoice ------------------------------------------------------------------------------------
SV_LEN, SV_DIM = 20, 560
SV_TOKENS = ["<blank>", "<|en|>", "<|NEUTRAL|>", "<|Speech|>", "<|woitn|>", "▁Hello", "▁art", "▁lovers",
             "JUNK", "<wrong-language>"]
# per output frame: the four query tokens, then repeats and blanks to merge, then junk past the length
SV_SCRIPT = [1, 2, 3, 4, 5, 5, 0, 6, 6, 6, 0, 0, 7, 7, 0, 0, 0, 0, 0, 0] + [8] * (SV_LEN + 4 - 20)


def make_sensevoice(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    f32, i32, i64 = TensorProto.FLOAT, TensorProto.INT32, TensorProto.INT64
    frames, vocab = SV_LEN + 4, len(SV_TOKENS)
    nodes = [
        # valid length = the mask's ones + the four queries (the length the model reports)
        helper.make_node("ReduceSum", ["mask"], ["ones"], keepdims=0),
        helper.make_node("Add", ["ones", "queries"], ["valid"]),
        helper.make_node("Reshape", ["valid", "one_shape"], ["lengths"]),
        # English (4) reads the script; any other language says so on every frame
        helper.make_node("Reshape", ["language", "empty_shape"], ["lang"]),
        helper.make_node("Equal", ["lang", "english"], ["is_en"]),
        helper.make_node("Where", ["is_en", "script", "wrong"], ["picked"]),
        helper.make_node("OneHot", ["picked", "depth", "onehot_values"], ["onehot"], axis=-1),
        helper.make_node("Reshape", ["onehot", "logits_shape"], ["logits"]),
        helper.make_node("ReduceMax", ["speech"], ["unused"], keepdims=0),
    ]
    init = [helper.make_tensor("queries", i32, [], [4]), helper.make_tensor("one_shape", i64, [1], [1]),
            helper.make_tensor("empty_shape", i64, [0], []), helper.make_tensor("english", i32, [], [4]),
            helper.make_tensor("script", i64, [frames], SV_SCRIPT),
            helper.make_tensor("wrong", i64, [frames], [9] * frames),
            helper.make_tensor("depth", i64, [], [vocab]),
            helper.make_tensor("onehot_values", f32, [2], [0.0, 1.0]),
            helper.make_tensor("logits_shape", i64, [3], [1, frames, vocab])]
    ins = [("speech", "float32", [1, SV_LEN, SV_DIM]), ("mask", "int32", [SV_LEN + 4]),
           ("language", "int32", [1])]
    outs = [("logits", "float32", [1, frames, vocab]), ("lengths", "int32", [1])]
    kinds = {"int32": i32, "float32": f32}
    graph = helper.make_graph(nodes, "sensevoice",
                              [helper.make_tensor_value_info(n, kinds[d], s) for n, d, s in ins],
                              [helper.make_tensor_value_info(n, kinds[d], s) for n, d, s in outs], init)
    save(graph, groups(ins, outs), dest / "sensevoice.axmodel")
    (dest / "tokens.txt").write_text("\n".join(SV_TOKENS) + "\n")
    vector = " ".join(["0"] * SV_DIM)
    ones = " ".join(["1"] * SV_DIM)
    (dest / "am.mvn").write_text(f"<Nnet>\n<AddShift> {SV_DIM} {SV_DIM}\n<LearnRateCoef> 0 [ {vector} ]\n"
                                 f"<Rescale> {SV_DIM} {SV_DIM}\n<LearnRateCoef> 0 [ {ones} ]\n</Nnet>\n")
    return dest


def test_sensevoice_merges_repeats_drops_blanks_and_stops_at_the_length(tmp_path: Path,
                                                                        card: fa.Card) -> None:
    from npu.speech.axera_sensevoice import AxSenseVoiceRunner, features, read_cmvn

    folder = make_sensevoice(tmp_path / "sensevoice")
    model = load_transcriber(folder, "axengine")
    assert isinstance(model, AxSenseVoiceRunner)
    shift, scale = read_cmvn(folder / "am.mvn")
    one_second = np.sin(np.arange(16000) / 16000 * 2 * np.pi * 300).astype(np.float32) * 0.3
    # Kaldi frames: 1 + (16000 - 400) // 160 = 98; low frame rate: (98 - 7) // 6 + 1 = 16 of 560
    assert features(one_second, shift, scale).shape == (16, 560)
    # 16 frames of a 20-frame slice: valid length 20, so frames 4..19 are read, never the junk past it
    segments = list(model.transcribe_steps(one_second, "en"))
    assert [s.text for s in segments] == ["Hello art lovers"]
    assert [s.text for s in model.transcribe_steps(one_second, "zh")] == ["<wrong-language>"]
    # 2 s = 32 low-rate frames in slices of 20 overlapping by 16 (0.06 s a frame), to the last frame
    two = np.concatenate([one_second, one_second])
    spans = [(round(s.start, 2), round(s.end, 2)) for s in model.transcribe_steps(two, "en")]
    assert spans == [(0.0, 1.2), (0.24, 1.44), (0.48, 1.68), (0.72, 1.92)]
    with pytest.raises(ValueError, match="does not know language 'fr'"):
        model.check_language("fr")
    model.close()
