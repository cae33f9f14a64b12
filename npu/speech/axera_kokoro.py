"""Kokoro (82M, 24 kHz) on the card, in AXERA's layout, driven as AXERA's own runner drives it.

The folder is what ``scripts/fetch_models kokoro-ax650`` assembles from AXERA-TECH/kokoro.axera:
``kokoro_part1_96.axmodel`` (text features and durations), ``kokoro_part2_96.axmodel`` (pitch,
energy and the aligned text), ``kokoro_part3_96.axmodel`` (the decoder, up to the spectrum),
``model4_har_sim.onnx`` (the harmonic source, on the CPU), Kokoro's ``config.json`` (its phoneme
vocabulary) and one ``<voice>.npy`` or more (a voice pack: one 256-wide style row per phoneme
count). Each rule follows AXERA-TECH/kokoro.axera at commit 47974ea, ``cpp/src/Kokoro.cpp`` and
``cpp/src/Kokoro.h`` (line numbers of those files):

- Files (``init``, Kokoro.cpp 252-255, 281; Kokoro.h 20-31): the three parts on the NPU, the
  harmonic model on ONNX Runtime with one thread (244-249); 96 tokens a chunk, 24 kHz out.
- Names and order (pulsar2 configs ``config/kokoro_{1,2,3}.json``, ``export_utils.py`` 115-175):
  part 1 takes ``input_ids``, ``ref_s``, ``text_mask`` and gives ``duration``, ``d``; part 2
  takes ``en``, ``ref_s``, ``input_ids``, ``text_mask``, ``pred_aln_trg`` and gives ``F0_pred``,
  ``N_pred``, ``asr``; the harmonic model takes ``F0_pred`` and gives ``har``; part 3 takes
  ``asr``, ``F0_pred``, ``N_pred``, ``ref_s``, ``har`` and gives ``x``. Shapes and dtypes are read
  from the sessions (the runner refuses a model whose inputs are not these).
- Tokens (``generate_input_ids_from_text``, 978-983): the phonemes' vocabulary ids between two 0s.
  Style (``load_voice_embedding``, 1198-1211): the voice pack's row for the phoneme count (ids
  less the two 0s), the middle row when the pack has fewer rows.
- Short input (``_prepare_input_ids``, 397-432): 32 ids or fewer are fed twice in a row (then
  0-padded), and the second half of the audio is dropped (813-820). Mask (434-443): 1 at the
  padding, 0 at the content, as ``uint8`` for part 1 and as float for part 2 (737-740).
- Durations (``_process_duration``, 445-540): sigmoid of ``duration``, summed over its last axis,
  over the speed, rounded, at least 1; fitted to twice the chunk (192 frames) by taking one
  frame from the longest tokens still above 1, and giving the padding positions what is left,
  the remainder one each from the first. Alignment (542-564): a one-hot ``[96, 192]`` matrix,
  token by frame; ``en`` is ``d`` transposed times it (719-733).
- Spectrum to audio (``_postprocess_x_to_audio``, 606-660): ``x``'s first 11 rows are the log
  magnitude, the next 11 the phase through ``sin``; inverse STFT with n_fft 20, hop 5, a Hann
  window, centred. Kokoro.cpp 629-633 takes ``sin(x)`` as the sine of the phase angle (and
  ``|cos|`` for its cosine); the model learned it as the angle itself (its own generator,
  ``kokoro/istftnet.py`` 457-458 with 96-99), which is followed here. Trim (923-931): audio kept
  in the ratio of the content's frames to all frames; a 0.05 s linear fade-out (933-945); 0.05 s
  of silence between sentences (174-226).

Deviations, on purpose: each sentence is its own step (AXERA merges short sentences up to 96
tokens, 1085-1196), so the first sentence plays sooner; a sentence over 96 tokens is halved at
its middle word until each half fits, as AXERA's ``split_long_sentence`` (986-1083) does. AXERA
takes at most one frame per token when the durations overrun 192 frames; here the pass repeats
until they fit, and a full chunk whose durations fall short is padded with empty frames, so the
alignment always has the 192 columns the compiled part 2 declares.

The front end is espeak-ng's IPA (the program the fallback voice runs), mapped onto Kokoro's
symbols (its diphthong letters A, I, O, W, Y and the affricates ʤ, ʧ). AXERA's English front end
is misaki's dictionaries and spaCy's tagger; spaCy's English model is no package on the
registries, so misaki's exact phonemes cannot be had offline here (docs/VOICE.md).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from npu.runtime.factory import open_session
from npu.sentences import split_sentences
from npu.speech.espeak_voice import espeak_program
from npu.speech.params import Piece

RATE = 24000
STYLE_DIM = 256
N_FFT, HOP = 20, 5
DOUBLE_THRESHOLD = 32
FADE_S, PAUSE_S = 0.05, 0.05
PARTS = ("kokoro_part1_96", "kokoro_part2_96", "kokoro_part3_96")
HARMONIC = "model4_har_sim"
INPUTS = {PARTS[0]: ("input_ids", "ref_s", "text_mask"),
          PARTS[1]: ("en", "ref_s", "input_ids", "text_mask", "pred_aln_trg"),
          PARTS[2]: ("asr", "F0_pred", "N_pred", "ref_s", "har"),
          HARMONIC: ("F0_pred",)}
# espeak-ng's IPA to Kokoro's symbols: its one-letter diphthongs and affricates, and the plain r
IPA_TO_KOKORO = (("eɪ", "A"), ("aɪ", "I"), ("oʊ", "O"), ("aʊ", "W"), ("ɔɪ", "Y"), ("dʒ", "ʤ"),
                 ("tʃ", "ʧ"), ("r", "ɹ"))


def is_axera_kokoro(folder: Path) -> bool:
    files = [f"{p}.axmodel" for p in PARTS] + [f"{HARMONIC}.onnx", "config.json"]
    return all((folder / f).is_file() for f in files) and any(folder.glob("*.npy"))


def espeak_phonemes(text: str, voice: str = "en-us") -> str:
    """espeak-ng's IPA of ``text`` (its clauses on one line), from the program, text on stdin."""
    program = espeak_program()
    if program is None:
        raise RuntimeError("Kokoro's front end needs espeak-ng (apt install espeak-ng)")
    done = subprocess.run([program, "-q", "--ipa", "-v", voice], input=text.encode("utf-8"),
                          capture_output=True, timeout=30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"espeak-ng failed: {done.stderr.decode('utf-8', 'replace').strip()}")
    return " ".join(done.stdout.decode("utf-8").split())


def to_kokoro_symbols(ipa: str, vocab: dict[str, int]) -> str:
    for source, target in IPA_TO_KOKORO:
        ipa = ipa.replace(source, target)
    return "".join(ch for ch in ipa if ch in vocab)


def fit_durations(raw: np.ndarray, content: int, seq_len: int, frames: int, speed: float) -> np.ndarray:
    """Per-token frame counts summing to ``frames``: the content's from the model, the rest on the
    padding (Kokoro.cpp 445-540, with the repeated pass of the docstring)."""
    summed = (1.0 / (1.0 + np.exp(-raw.astype(np.float64)))).sum(axis=-1) / speed
    dur = np.zeros(seq_len, np.int64)
    dur[:content] = np.maximum(1, np.round(summed[:content])).astype(np.int64)
    while dur[:content].sum() > frames and (dur[:content] > 1).any():
        over = int(dur[:content].sum() - frames)
        for idx in np.argsort(-dur[:content], kind="stable"):
            if over <= 0:
                break
            if dur[idx] > 1:
                dur[idx] -= 1
                over -= 1
    left, padding = int(frames - dur[:content].sum()), seq_len - content
    if left > 0 and padding > 0:
        dur[content:] = left // padding
        dur[content:content + left % padding] += 1
    return dur


def alignment(dur: np.ndarray, frames: int) -> np.ndarray:
    """One-hot ``[tokens, frames]``: token i owns its ``dur[i]`` frames, in order; columns past
    the durations' sum stay empty."""
    aln = np.zeros((len(dur), frames), np.float32)
    owners = np.repeat(np.arange(len(dur)), dur)[:frames]
    aln[owners, np.arange(len(owners))] = 1.0
    return aln


def istft(log_magnitude: np.ndarray, raw_phase: np.ndarray) -> np.ndarray:
    """The centred inverse STFT (periodic Hann, n_fft 20, hop 5) of magnitude ``exp`` of the first
    rows and phase angle ``sin`` of the others, as Kokoro's generator reads its output
    (``kokoro/istftnet.py`` 457-458, 96-99: ``torch.istft`` of ``magnitude * exp(1j * phase)``)."""
    magnitude = np.exp(log_magnitude.astype(np.float64))
    angle = np.sin(raw_phase.astype(np.float64))
    frames = np.fft.irfft(magnitude * np.exp(1j * angle), n=N_FFT, axis=0)  # [n_fft, T]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)  # periodic Hann
    count = frames.shape[1]
    length = N_FFT + HOP * (count - 1)
    out, norm = np.zeros(length), np.zeros(length)
    for t in range(count):
        out[t * HOP:t * HOP + N_FFT] += frames[:, t] * window
        norm[t * HOP:t * HOP + N_FFT] += window ** 2
    out /= np.where(norm > 1e-11, norm, 1.0)
    return out[N_FFT // 2:N_FFT // 2 + HOP * (count - 1)].astype(np.float32)


class AxKokoroRunner:
    """A resident Kokoro: three card sessions, the CPU harmonic model, the vocabulary, a voice."""

    rate = RATE

    def __init__(self, folder: Path, backend: str = "axengine", device_id: int = 0) -> None:
        if not is_axera_kokoro(folder):
            raise FileNotFoundError(f"{folder} holds no AXERA Kokoro ({', '.join(PARTS)} .axmodel, "
                                    f"{HARMONIC}.onnx, config.json, a voice .npy)")
        self.backend = backend
        self.vocab: dict[str, int] = json.loads((folder / "config.json").read_text("utf-8"))["vocab"]
        voice = sorted(folder.glob("*.npy"))[0]
        self.name = f"kokoro-{voice.stem}"
        self.pack = np.load(voice, allow_pickle=False).astype(np.float32).reshape(-1, STYLE_DIM)
        self.parts = [open_session(folder, p, backend, device_id=device_id) for p in PARTS]
        self.harmonic = open_session(folder, HARMONIC, "onnx", threads=1)
        self._check_names()
        first = {i.name: i for i in self.parts[0].get_inputs()}
        self.seq_len = int(first["input_ids"].shape[-1])  # type: ignore[arg-type]
        second = {i.name: i for i in self.parts[1].get_inputs()}
        self.frames = int(second["pred_aln_trg"].shape[-1])  # type: ignore[arg-type]
        self.dtypes = {s: {i.name: i.dtype for i in sess.get_inputs()}
                       for s, sess in zip(PARTS, self.parts, strict=True)}

    def _check_names(self) -> None:
        problems = []
        for stem, session in (*zip(PARTS, self.parts, strict=True), (HARMONIC, self.harmonic)):
            names = tuple(i.name for i in session.get_inputs())
            if sorted(names) != sorted(INPUTS[stem]):
                problems.append(f"{stem} takes {', '.join(names)}, not {', '.join(INPUTS[stem])}")
        if problems:
            raise ValueError("not AXERA's Kokoro: " + "; ".join(problems))

    def token_ids(self, text: str) -> list[int]:
        symbols = to_kokoro_symbols(espeak_phonemes(text), self.vocab)
        tail = text.strip()[-1:]
        if tail in self.vocab and not symbols.endswith(tail):
            symbols += tail  # espeak-ng's IPA drops punctuation; Kokoro pauses on it
        return [0, *(self.vocab[ch] for ch in symbols), 0]

    def chunks(self, sentence: str) -> list[list[int]]:
        """The sentence's ids, halved at its middle word until each part fits one chunk."""
        ids = self.token_ids(sentence)
        words = sentence.split()
        if len(ids) <= self.seq_len:
            return [ids] if len(ids) > 2 else []
        if len(words) > 1:
            mid = len(words) // 2
            halves = [" ".join(words[:mid]), " ".join(words[mid:])]
        else:
            halves = [sentence[:len(sentence) // 2], sentence[len(sentence) // 2:]]
        if any(len(h) == len(sentence) or not h for h in halves):
            raise ValueError(f"a word too long to speak: {sentence[:40]!r}")
        return [c for h in halves for c in self.chunks(h)]

    def style(self, ids: list[int]) -> np.ndarray:
        row = len(ids) - 2
        return self.pack[row if row < len(self.pack) else len(self.pack) // 2].reshape(1, STYLE_DIM)

    def _feed(self, stem: str, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: v.astype(self.dtypes[stem][k]) for k, v in values.items()}

    def synthesise(self, ids: list[int], speed: float) -> np.ndarray:
        """One chunk of at most ``seq_len`` ids to float audio at 24 kHz."""
        L, F = self.seq_len, self.frames
        original = len(ids)
        doubled = original <= DOUBLE_THRESHOLD
        content = min(2 * original, L) if doubled else original
        padded = np.zeros((1, L), np.int64)
        padded[0, :content] = (ids + ids)[:content] if doubled else ids
        mask = (np.arange(L) >= content).astype(np.uint8).reshape(1, L)
        ref_s = self.style(ids)
        duration, d = self.parts[0].run(None, self._feed(PARTS[0], {
            "input_ids": padded, "ref_s": ref_s, "text_mask": mask}))[:2]
        dur = fit_durations(np.asarray(duration)[0], content, L, F, speed)
        aln = alignment(dur, F)
        en = (np.asarray(d, np.float32)[0].T @ aln)[None]
        f0, noise, asr = self.parts[1].run(None, self._feed(PARTS[1], {
            "en": en, "ref_s": ref_s, "input_ids": padded, "text_mask": mask.astype(np.float32),
            "pred_aln_trg": aln[None]}))[:3]
        har = self.harmonic.run(None, {"F0_pred": np.asarray(f0, np.float32)})[0]
        x = np.asarray(self.parts[2].run(None, self._feed(PARTS[2], {
            "asr": np.asarray(asr), "F0_pred": np.asarray(f0), "N_pred": np.asarray(noise),
            "ref_s": ref_s, "har": np.asarray(har)}))[0], np.float32)[0]
        bins = N_FFT // 2 + 1
        audio = istft(x[:bins], x[bins:2 * bins])
        total = int(dur.sum())
        if doubled:
            kept_frames = int(dur[:original].sum())
            audio, total = audio[:len(audio) // 2], total // 2
        else:
            kept_frames = int(dur[:content].sum())
        if original < L and total > 0:
            audio = audio[:int(len(audio) * kept_frames / total)]
        fade = int(RATE * FADE_S)
        if len(audio) > fade:
            audio[-fade:] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)
        return audio

    def speak_steps(self, text: str, speed: float = 1.0) -> Iterator[Piece]:
        from npu.speech.audio import to_pcm16

        pause = np.zeros(int(RATE * PAUSE_S / speed), np.float32)
        first = True
        for sentence in split_sentences(text):
            parts = [self.synthesise(ids, speed) for ids in self.chunks(sentence.strip())]
            if not parts:
                continue
            audio = np.concatenate(([] if first else [pause]) + parts)
            first = False
            yield Piece(to_pcm16(audio), RATE, sentence.strip())

    def warm_up(self) -> None:
        pass

    def close(self) -> None:
        for session in (*self.parts, self.harmonic):
            session.close()
