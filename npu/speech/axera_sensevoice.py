"""SenseVoice on the card, in AXERA's layout, driven as AXERA's own runner drives it.

The folder is what AXERA's ``ax_asr_api`` loads for ``sensevoice`` (its ``download_models.sh``
puts it under ``models-ax650/sensevoice``): ``sensevoice.axmodel`` and ``tokens.txt``, plus the
model's ``am.mvn`` (FunASR's Kaldi-nnet CMVN file, which SenseVoice ships and AXERA's runner has
compiled in). Each rule follows AXERA-TECH/ax_asr_api at commit df475fe,
``cpp/src/asr/sensevoice.cpp`` (the line numbers are of that file without its comment lines):

- Files and shapes (``init``, 31-58): input 0 is ``[1, max_seq_len, feature_dim]`` float32 (the
  slice length and 80 x 7 = 560 read from the model), input 1 the mask, ``max_seq_len + 4``
  int32 (the four query tokens), input 2 the language, one int32; output 0 the CTC logits
  ``[1, frames, vocab]``, output 1 their valid length, one int32.
- Language (``lid_dict_``, 327-334): ``auto`` 0, ``zh`` 3, ``en`` 4, ``yue`` 7, ``ja`` 11, ``ko`` 12.
- Features (``run``, 63-70; ``init_fbank_``, 124-141; ``preprocess_``, 152-172): samples scaled to
  16-bit range (x 32768), Kaldi fbank with 80 bins, 25 ms frames every 10 ms, Hamming window,
  DC offset removed, edges snipped, dither 1.0, low 20 Hz, high the Nyquist (``0``), Kaldi's
  (not librosa's) mel scale: kaldi-native-fbank, the library AXERA links. Then low frame rate
  (``apply_lfr_``, 187-202): windows of 7 frames every 6, concatenated; then CMVN
  (``apply_cmvn_``, 203-214): ``(x + shift) * scale`` with ``am.mvn``'s ``<AddShift>`` and
  ``<Rescale>`` vectors.
- Slices (``run``, 73-95): at most ``max_seq_len`` (L) frames each, zero-padded to L, the next
  starting 16 frames before the previous one ended. One deviation: AXERA takes
  ``ceil(frames / L)`` slices ``[i * L - 16, (i + 1) * L - 16)``, so the last 16 frames per extra
  slice of a long recording are never read; here slices go on until every frame was.
  Mask (``sequence_mask_``, 215-218): ones for the slice's frames, zeros after.
- Decoding (``postprocess_``, 219-241): nothing when the valid length is 4 or less; else the argmax
  of each frame from 4 to the valid length, consecutive repeats merged, blanks (0) dropped. The
  text is the tokens joined (``run``, 105-109); here SentencePiece's word marker ``▁`` is shown
  as a space, which AXERA's joined string leaves in.

One slice is one step of the job and one segment of the transcript.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from npu.runtime.factory import open_session
from npu.speech.params import Segment

RATE = 16000
LANGUAGES = {"auto": 0, "zh": 3, "en": 4, "yue": 7, "ja": 11, "ko": 12}
QUERIES = 4
PADDING = 16
LFR_WINDOW, LFR_SHIFT = 7, 6
N_MELS = 80
FILES = ("sensevoice.axmodel", "tokens.txt", "am.mvn")


def is_axera_sensevoice(folder: Path) -> bool:
    return all((folder / name).is_file() for name in FILES)


def read_cmvn(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``<AddShift>`` and ``<Rescale>`` of a Kaldi nnet CMVN file: each is the bracketed vector on
    the line after its tag (``<LearnRateCoef> 0 [ ... ]``)."""
    lines = path.read_text("utf-8").splitlines()
    found: dict[str, np.ndarray] = {}
    for i, line in enumerate(lines[:-1]):
        tag = line.split()[0] if line.split() else ""
        following = lines[i + 1].split()
        if tag in ("<AddShift>", "<Rescale>") and following[:1] == ["<LearnRateCoef>"]:
            found[tag] = np.array([float(v) for v in following[3:-1]], np.float32)
    if set(found) != {"<AddShift>", "<Rescale>"}:
        raise ValueError(f"{path} has no <AddShift> and <Rescale> vectors")
    return found["<AddShift>"], found["<Rescale>"]


def features(samples: np.ndarray, shift: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``[frames, 560]``: AXERA's fbank, low frame rate and CMVN of 16 kHz float samples."""
    import kaldi_native_fbank as knf

    opts = knf.FbankOptions()
    opts.frame_opts.dither = 1.0
    opts.frame_opts.snip_edges = True
    opts.frame_opts.samp_freq = RATE
    opts.frame_opts.frame_shift_ms = 10
    opts.frame_opts.frame_length_ms = 25
    opts.frame_opts.remove_dc_offset = True
    opts.frame_opts.window_type = "hamming"
    opts.mel_opts.num_bins = N_MELS
    opts.mel_opts.high_freq = 0
    opts.mel_opts.low_freq = 20
    opts.mel_opts.is_librosa = False
    fbank = knf.OnlineFbank(opts)
    fbank.accept_waveform(RATE, (samples.astype(np.float32) * 32768).tolist())
    fbank.input_finished()
    frames = np.array([fbank.get_frame(i) for i in range(fbank.num_frames_ready)], np.float32)
    if len(frames) < LFR_WINDOW:
        return np.zeros((0, N_MELS * LFR_WINDOW), np.float32)
    count = (len(frames) - LFR_WINDOW) // LFR_SHIFT + 1
    lfr = np.stack([frames[i * LFR_SHIFT:i * LFR_SHIFT + LFR_WINDOW].reshape(-1) for i in range(count)])
    return ((lfr + shift) * scale).astype(np.float32)


class AxSenseVoiceRunner:
    """A resident SenseVoice on the card: one CTC model, its tokens and its CMVN."""

    rate = RATE
    name = "sensevoice"
    english_only = False

    def __init__(self, folder: Path, backend: str = "axengine", device_id: int = 0) -> None:
        if not is_axera_sensevoice(folder):
            raise FileNotFoundError(f"{folder} holds no AXERA SenseVoice ({', '.join(FILES)})")
        self.backend = backend
        self.tokens = (folder / "tokens.txt").read_text("utf-8").splitlines()
        self.shift, self.scale = read_cmvn(folder / "am.mvn")
        self.session = open_session(folder, "sensevoice", backend, device_id=device_id)
        ins = self.session.get_inputs()
        if len(ins) != 3 or len(ins[0].shape) != 3:
            raise ValueError("sensevoice.axmodel must take features [1, frames, dim], the mask and the "
                             "language")
        self.inputs = ins
        self.max_len, self.dim = int(ins[0].shape[1]), int(ins[0].shape[2])
        if self.dim != len(self.shift) or self.dim != N_MELS * LFR_WINDOW:
            raise ValueError(f"sensevoice.axmodel reads {self.dim} features a frame; am.mvn has "
                             f"{len(self.shift)} and the features are {N_MELS * LFR_WINDOW}")

    def check_language(self, language: str | None) -> None:
        if language and language not in LANGUAGES:
            raise ValueError(f"the speech-to-text model sensevoice does not know language {language!r}; "
                             f"it knows {', '.join(sorted(LANGUAGES))}")

    def transcribe_steps(self, samples: np.ndarray, language: str | None = None) -> Iterator[Segment]:
        feats = features(samples, self.shift, self.scale)
        total = len(feats)
        seconds_per_frame = LFR_SHIFT * 0.01
        start, i = 0, 0
        while True:
            end = min(start + self.max_len, total)
            text = self._slice(feats[start:end], LANGUAGES[language or "auto"])
            yield Segment(i, start * seconds_per_frame, end * seconds_per_frame, text)
            if end >= total:
                return
            start, i = end - PADDING, i + 1

    def _slice(self, part: np.ndarray, language: int) -> str:
        feed = np.zeros((1, self.max_len, self.dim), np.float32)
        feed[0, :len(part)] = part
        mask = np.zeros(self.inputs[1].shape, np.int32)
        mask.reshape(-1)[:len(part)] = 1
        names = [t.name for t in self.inputs]
        lang = np.full(self.inputs[2].shape, language, np.int32)
        logits, lengths = self.session.run(None, {names[0]: feed, names[1]: mask, names[2]: lang})[:2]
        valid = int(np.asarray(lengths).reshape(-1)[0])
        if valid <= QUERIES:
            return ""
        best = np.asarray(logits).reshape(-1, logits.shape[-1])[QUERIES:valid].argmax(axis=-1)
        merged = [int(t) for k, t in enumerate(best) if k == 0 or t != best[k - 1]]
        text = "".join(self.tokens[t] for t in merged if t != 0 and t < len(self.tokens))
        return text.replace("▁", " ").strip()

    def close(self) -> None:
        self.session.close()
