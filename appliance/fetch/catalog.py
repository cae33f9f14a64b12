"""The models ``scripts/fetch_models`` knows, each at a pinned revision.

AXERA publishes compiled models on Hugging Face in its own layout: the per-layer ``.axmodel`` files
(sometimes in a subfolder), its runtime's ``config.json`` (not the model's architecture) and a
tokenizer in a format for its C++ runtime. The appliance needs the bundle contract of
``docs/ARCHITECTURE.md``: the compiled files next to the model's Hugging Face ``config.json``,
``tokenizer.json`` and ``tokenizer_config.json``. So a chat entry names two pinned repositories:
AXERA's for the compiled files and the original model's for those three small files.

Revisions are commit hashes, never branch names: a file changed upstream cannot silently change
what an installation runs. Moving to a newer revision is an edit here, checked on a card.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

Revision = str
REVISION_PATTERN = r"^[0-9a-f]{40}$"


class RepoFiles(BaseModel):
    """Files taken from one Hugging Face repository at one commit."""

    repo: str = Field(..., pattern=r"^[\w.-]+/[\w.-]+$")
    revision: Revision = Field(..., pattern=REVISION_PATTERN)
    folder: str = Field("", description="where the files sit inside the repository ('' for its root)")


class ChatSource(BaseModel):
    kind: Literal["chat"] = "chat"
    compiled: RepoFiles
    prefix: str = Field(..., description="layer file prefix: <prefix>_p128_l<i>_together.axmodel")
    upstream: RepoFiles = Field(..., description="the original model: config.json and the tokenizer")
    upstream_files: tuple[str, ...] = ("config.json", "generation_config.json", "tokenizer.json",
                                       "tokenizer_config.json")


class ImageSource(BaseModel):
    kind: Literal["image"] = "image"
    compiled: RepoFiles
    files: tuple[str, ...] = Field(..., description="paths under compiled.folder, kept as they are")


class SpeechSource(BaseModel):
    """A speech model in AXERA's layout: the listed files, flat in one folder, as AXERA's own
    runners load them (``npu/speech/transcribers.py`` and ``voices.py`` recognise the folder)."""

    kind: Literal["stt", "tts"]
    compiled: RepoFiles
    files: tuple[str, ...] = Field(..., description="paths under compiled.folder, kept by their names")


class CatalogEntry(BaseModel):
    id: str = Field(..., pattern=r"^[a-zA-Z0-9._-]+$", description="the model id clients ask for")
    title: str
    source: ChatSource | ImageSource | SpeechSource = Field(..., discriminator="kind")
    note: str = ""

    @property
    def kind(self) -> str:
        return self.source.kind


SD15_LCM_FILES = (
    "text_encoder/sd15_text_encoder_sim.axmodel",
    "text_encoder/config.json",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet.axmodel",
    "vae_decoder.axmodel",
    "time_input_txt2img.npy",
)  # the VAE encoder and the img2img table serve image-to-image, which the appliance does not do

# AXERA's speech models. Each revision is the commit a published deployment guide pins and names
# the files of (AXERA-TECH/Whisper at 143121c, SenseVoice at 6ef7cf8, kokoro.axera at db9625f).
# Whisper small, base and
# turbo sit beside tiny in AXERA's repository but no source here lists their files at a pinned
# commit, so they are left out rather than guessed; so is MeloTTS, which the appliance does not run.
WHISPER_TINY_FILES = ("tiny-encoder.axmodel", "tiny-decoder.axmodel", "tiny-tokens.txt", "tiny_config.json")
SENSEVOICE_FILES = ("sensevoice.axmodel", "tokens.txt", "am.mvn")
KOKORO_FILES = ("models/kokoro_part1_96.axmodel", "models/kokoro_part2_96.axmodel",
                "models/kokoro_part3_96.axmodel", "models/model4_har_sim.onnx", "checkpoints/config.json",
                "checkpoints/voices_npy/af_heart.npy")  # kokoro.axera at db9625f, as the guide lists them

CATALOG: tuple[CatalogEntry, ...] = (
    CatalogEntry(
        id="qwen2.5-0.5b-instruct",
        title="Qwen2.5-0.5B-Instruct, int8 weights, long context (AX650)",
        source=ChatSource(
            compiled=RepoFiles(repo="AXERA-TECH/Qwen2.5-0.5B-Instruct-CTX-Int8",
                               revision="2aca5290377e6fa7ec1f49e37eda6554699ccfd0",
                               folder="qwen2.5-0.5b-gptq-int8-ctx-ax650"),
            prefix="qwen2",
            upstream=RepoFiles(repo="Qwen/Qwen2.5-0.5B-Instruct",
                               revision="7ae557604adf67be50417f59c2c2f167def9a775"),
        ),
        note="the quickest chat model here; a good first model",
    ),
    CatalogEntry(
        id="qwen3-0.6b",
        title="Qwen3-0.6B, int8 weights (AX650)",
        source=ChatSource(
            compiled=RepoFiles(repo="AXERA-TECH/Qwen3-0.6B",
                               revision="9bd240869b5ec6f28964a635cd421a80fcad9dc8"),
            prefix="qwen3",
            upstream=RepoFiles(repo="Qwen/Qwen3-0.6B", revision="c1899de289a04d12100db370d81485cdf75e47ca"),
        ),
        note="thinking is off unless a request asks for it",
    ),
    CatalogEntry(
        id="sd15-lcm",
        title="Stable Diffusion 1.5 with LCM-LoRA, 512x512, 4 steps (AX650)",
        source=ImageSource(
            compiled=RepoFiles(repo="AXERA-TECH/lcm-lora-sdv1-5",
                               revision="4ba40db7f8fddbf3e4f86edacf7fb255bb45d339", folder="models"),
            files=SD15_LCM_FILES,
        ),
        note="about 2.8 s per 512x512 image on the card",
    ),
    CatalogEntry(
        id="whisper-tiny-ax650",
        title="Whisper tiny, multilingual speech to text (AX650)",
        source=SpeechSource(
            kind="stt",
            compiled=RepoFiles(repo="AXERA-TECH/Whisper", revision="143121c8a628bbb463bf4e19e8e7711dd2192e27",
                               folder="models-ax650/tiny"),
            files=WHISPER_TINY_FILES,
        ),
        note="real-time factor 0.037 on the card (ax_asr_api's table): 5 s of speech in about 0.19 s",
    ),
    CatalogEntry(
        id="sensevoice-ax650",
        title="SenseVoice small: Chinese, English, Cantonese, Japanese, Korean speech to text (AX650)",
        source=SpeechSource(
            kind="stt",
            compiled=RepoFiles(repo="AXERA-TECH/SenseVoice",
                               revision="6ef7cf855a8f1661c29e2015abdb628e9258fa98",
                               folder="sensevoice_ax650"),
            files=SENSEVOICE_FILES,
        ),
        note="real-time factor 0.036 on the card (ax_asr_api's table); language auto-detected",
    ),
    CatalogEntry(
        id="kokoro-ax650",
        title="Kokoro 82M, American English voice af_heart, 24 kHz (AX650; espeak-ng phonemes)",
        source=SpeechSource(
            kind="tts",
            compiled=RepoFiles(repo="AXERA-TECH/kokoro.axera",
                               revision="db9625f0270396c108d0273b01477d86b4e5e7fe"),
            files=KOKORO_FILES,
        ),
        note="about 0.23 s of card time per chunk of up to 96 phonemes (a published deployment run)",
    ),
)


def find_entry(model_id: str) -> CatalogEntry:
    for entry in CATALOG:
        if entry.id == model_id:
            return entry
    known = ", ".join(e.id for e in CATALOG)
    raise ValueError(f"no model {model_id!r} in the catalog; known: {known}")
