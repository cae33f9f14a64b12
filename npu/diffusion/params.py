"""What one image job asks for, and what it gives back."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from npu.bounds import Bound
from npu.diffusion.image_encode import ImageFormat

DEFAULT_STEPS = 4
MAX_GUIDANCE = 4.0
SEED_MAX = 2**32 - 1  # the noise generator's seeds; n pictures use seed, seed + 1, ... modulo 2**32
SEED_BOUND = Bound(0, SEED_MAX, f"-1 (random) or from 0 to {SEED_MAX}", random=-1)


@dataclass(frozen=True)
class ImageParams:
    prompt: str
    negative_prompt: str = ""
    width: int | None = None  # None: the model's size
    height: int | None = None
    steps: int = DEFAULT_STEPS
    seed: int | None = None  # drawn at submit when None, so a retried job repeats itself
    guidance_scale: float = 1.0  # LCM is distilled without guidance; > 1 runs the UNet twice per step
    format: ImageFormat = "png"
    quality: int = 90  # JPEG's starting quality
    max_bytes: int = 4_000_000


@dataclass(frozen=True)
class ImageTimings:
    text_ms: float = 0.0
    unet_ms: list[float] = field(default_factory=list)
    vae_ms: float = 0.0
    encode_ms: float = 0.0


@dataclass(frozen=True)
class ImageFacts:
    """What a picture is, before and after encoding."""

    width: int
    height: int
    seed: int
    steps: int
    prompt_tokens: int
    truncated: bool
    timings: ImageTimings


@dataclass(frozen=True)
class DecodedImage(ImageFacts):
    """The device's work done: the VAE's output, to be encoded on the host."""

    vae_output: np.ndarray  # NCHW in [-1, 1]


@dataclass(frozen=True)
class ImageOutput(ImageFacts):
    data: bytes
    content_type: str
    format: ImageFormat
    quality: int | None


@dataclass(frozen=True)
class ImageStep:
    """One engine step done: ``stage`` is text, unet (``step`` of ``steps``), vae; the last
    step carries the ``decoded`` picture."""

    stage: str
    step: int
    steps: int
    decoded: DecodedImage | None = None
    latents: np.ndarray | None = None  # after a UNet step: the denoised estimate, for a preview
