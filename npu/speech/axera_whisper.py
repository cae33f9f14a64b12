"""Whisper on the card, in AXERA's layout, driven as AXERA's own runner drives it.

The folder is what AXERA's ``ax_asr_api`` loads for one model type (``tiny``, ``base``,
``small``, ``turbo``; its ``download_models.sh`` puts them under ``models-ax650/whisper``):
``<type>-encoder.axmodel``, ``<type>-decoder.axmodel``, ``<type>-tokens.txt`` and
``<type>_config.json``. Each rule follows AXERA-TECH/ax_asr_api at commit df475fe,
``cpp/src/asr/whisper.cpp``:

- Files (``init``, lines 103-112): the four names above, the type read from the folder.
- Config (``load_config_``, 225-255): ``n_mels``, ``n_vocab``, ``n_text_layer``, ``n_text_ctx``,
  ``n_text_state``, ``sot``, ``eot``, ``no_timestamps``, ``transcribe``, ``translate``, and the
  languages as two comma-separated strings, ``all_language_tokens`` and ``all_language_codes``.
- Tokens (``load_tokens_``, 209-223): one line per token id, ``<base64 of its bytes> <id>``; the
  text is the decoded bytes of the generated tokens joined (``run``, 184-190), read as UTF-8.
- Features (``preprocess_``, 284-311): 16 kHz audio; a log-mel spectrogram with ``n_fft`` 400,
  hop 160, Hann window, power 2, ``n_mels`` bands; ``log10(max(x, 1e-10))``, clamped to 8 below
  its maximum, ``(x + 4) / 4``; then each band cut or padded with zeros to 3000 frames (30 s):
  the encoder's one input, ``[1, n_mels, 3000]`` float32. Audio longer than 30 s is cut there by
  AXERA; here it is run as successive 30-second windows, one segment each. The spectrogram is
  faster-whisper's ``FeatureExtractor`` (the same filters and normalisation, without its padding).
- Encoder (``run``, 150-157; ``dma_cross_kv_``, 313-326): outputs 0 and 1, ``cross_k`` and
  ``cross_v``, are the decoder's inputs 3 and 4 for the whole window.
- Decoder feeds (``run_decoder_``, 336-362): inputs in order ``tokens`` (one int32), ``self_k``
  and ``self_v`` (``[n_text_layer, n_text_ctx, n_text_state]`` float32), ``cross_k``,
  ``cross_v``, ``offset`` (one int32: the position written) and ``mask`` (``n_text_ctx`` int32).
- Mask (``causal_mask_1d_``, 328-333; ``run``, 162-163): all ones (hidden) at the start of a
  window; before the step at ``offset`` > 0, ``mask[offset - 1]`` becomes 0, so rows
  ``0..offset-1`` are visible.
- Cache (``run_decoder_``, 364-382; ``run``, 165-167): zeroed per window; outputs 1 and 2
  (``[n_text_layer, 1, n_text_state]``) are written into row ``offset`` of each layer.
- Loop (``run``, 169-182; ``init_features_``, 263-266): the start sequence ``sot``, the language's
  token, ``transcribe``, ``no_timestamps`` is decoded at offsets 0..3; then greedy (argmax of
  output 0, the logits) until ``eot`` or ``n_text_ctx``.

Names are matched by position, as AXERA's runner sets inputs by index; the session's declared
names and shapes are read (never assumed), so a model whose shapes differ fails at load saying so.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from npu.runtime.factory import open_session
from npu.speech.params import Segment

FRAMES = 3000  # 30 s of 10 ms frames: the encoder's fixed width
RATE = 16000
WINDOW_SAMPLES = RATE * 30
MODEL_TYPES = ("tiny", "base", "small", "turbo")


def find_model_type(folder: Path) -> str | None:
    """The AXERA Whisper type whose four files are in ``folder``, or None."""
    for kind in MODEL_TYPES:
        names = (f"{kind}-encoder.axmodel", f"{kind}-decoder.axmodel", f"{kind}-tokens.txt",
                 f"{kind}_config.json")
        if all((folder / n).is_file() for n in names):
            return kind
    return None


def log_mel(samples: np.ndarray, n_mels: int) -> np.ndarray:
    """``[1, n_mels, 3000]``: AXERA's features for up to 30 s of 16 kHz audio."""
    from faster_whisper.feature_extractor import FeatureExtractor

    mel = FeatureExtractor(feature_size=n_mels)(samples.astype(np.float32), padding=0)
    out = np.zeros((1, n_mels, FRAMES), np.float32)
    frames = min(mel.shape[-1], FRAMES)
    out[0, :, :frames] = mel[:, :frames]
    return out


class AxWhisperRunner:
    """A resident AXERA Whisper: encoder and decoder sessions, the tokens, the language map."""

    rate = RATE

    def __init__(self, folder: Path, backend: str = "axengine", device_id: int = 0) -> None:
        kind = find_model_type(folder)
        if kind is None:
            raise FileNotFoundError(f"{folder} holds no AXERA Whisper (<type>-encoder.axmodel, "
                                    "<type>-decoder.axmodel, <type>-tokens.txt, <type>_config.json)")
        self.name = f"whisper-{kind}"
        self.backend = backend
        config = json.loads((folder / f"{kind}_config.json").read_text("utf-8"))
        self.config = config
        codes = [c.strip() for c in str(config["all_language_codes"]).split(",")]
        tokens = [int(t) for t in str(config["all_language_tokens"]).split(",")]
        self.languages = dict(zip(codes, tokens, strict=True))
        self.english_only = set(self.languages) <= {"en"}
        self.vocab = [base64.b64decode(line.split(" ", 1)[0]) if line.strip() else b""
                      for line in (folder / f"{kind}-tokens.txt").read_text("utf-8").splitlines()]
        self.encoder = open_session(folder, f"{kind}-encoder", backend, device_id=device_id)
        self.decoder = open_session(folder, f"{kind}-decoder", backend, device_id=device_id)
        self._check_shapes()

    def _check_shapes(self) -> None:
        c = self.config
        cache = (c["n_text_layer"], c["n_text_ctx"], c["n_text_state"])
        enc_in = self.encoder.get_inputs()[0]
        dec_in = self.decoder.get_inputs()
        want = {0: (1,), 1: cache, 2: cache, 5: (1,), 6: (c["n_text_ctx"],)}
        problems = [f"encoder input {enc_in.name} is {enc_in.shape}, not (1, {c['n_mels']}, {FRAMES})"
                    ] if tuple(enc_in.shape) != (1, c["n_mels"], FRAMES) else []
        if len(dec_in) != 7:
            problems.append(f"the decoder has {len(dec_in)} inputs, not 7 (tokens, self_k, self_v, cross_k, "
                            "cross_v, offset, mask)")
        else:
            problems += [f"decoder input {i} ({dec_in[i].name}) is {dec_in[i].shape}, not {shape}"
                         for i, shape in want.items() if tuple(dec_in[i].shape) != shape]
        if problems:
            raise ValueError("; ".join(problems))

    def check_language(self, language: str | None) -> None:
        if language and language not in self.languages:
            raise ValueError(f"the speech-to-text model {self.name} does not know language {language!r}; "
                             f"it knows {', '.join(sorted(self.languages))}")

    def transcribe_steps(self, samples: np.ndarray, language: str | None = None) -> Iterator[Segment]:
        """One segment per 30-second window, each one encoder run and a decoder loop."""
        lang = language or ("en" if "en" in self.languages else next(iter(self.languages)))
        for n, start in enumerate(range(0, max(len(samples), 1), WINDOW_SAMPLES)):
            window = samples[start:start + WINDOW_SAMPLES]
            text = self._window(window, lang)
            yield Segment(n, start / RATE, (start + len(window)) / RATE, text)

    def _window(self, samples: np.ndarray, language: str) -> str:
        c = self.config
        n_layer, n_ctx, n_state = c["n_text_layer"], c["n_text_ctx"], c["n_text_state"]
        enc_in = self.encoder.get_inputs()[0]
        cross = self.encoder.run(None, {enc_in.name: log_mel(samples, c["n_mels"])})
        names = [t.name for t in self.decoder.get_inputs()]
        feeds: dict[str, Any] = {names[3]: cross[0], names[4]: cross[1]}
        self_k = np.zeros((n_layer, n_ctx, n_state), np.float32)
        self_v = np.zeros_like(self_k)
        mask = np.ones(n_ctx, np.int32)
        start = [c["sot"], self.languages[language], c["transcribe"], c["no_timestamps"]]
        generated: list[int] = []
        token, offset = start[0], 0
        for offset in range(n_ctx):
            if offset < len(start):
                token = start[offset]
            elif token == c["eot"]:
                break
            else:
                generated.append(token)
            if offset > 0:
                mask[offset - 1] = 0
            feeds.update({names[0]: np.array([token], np.int32), names[1]: self_k, names[2]: self_v,
                          names[5]: np.array([offset], np.int32), names[6]: mask})
            logits, new_k, new_v = self.decoder.run(None, feeds)[:3]
            self_k[:, offset, :] = new_k.reshape(n_layer, n_state)
            self_v[:, offset, :] = new_v.reshape(n_layer, n_state)
            token = int(np.argmax(logits))
        text = b"".join(self.vocab[t] for t in generated if t < len(self.vocab))
        return text.decode("utf-8", "replace").strip()

    def close(self) -> None:
        for session in (self.encoder, self.decoder):
            session.close()
