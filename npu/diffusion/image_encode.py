"""The VAE's output to PNG or JPEG bytes that fit a size limit (the broker's packet limit)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

ImageFormat = Literal["png", "jpeg"]
CONTENT_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg"}
JPEG_FLOOR = 40  # below this a picture on a gallery wall looks broken; refuse instead
JPEG_STEP = 10
PNG_LEVEL = 6


class ImageTooLarge(ValueError):
    pass


@dataclass(frozen=True)
class EncodedImage:
    data: bytes
    content_type: str
    format: ImageFormat
    quality: int | None


def to_pixels(decoded: np.ndarray) -> np.ndarray:
    """VAE output NCHW in [-1, 1] -> HWC uint8 RGB.

    AXERA's compiled VAE may return a fourth channel; like its own script
    (sd1.5-lcm.axera ``python/run_txt2img_axe_infer.py``: ``image[:, :, :3]``), only the first
    three are the picture.
    """
    image = np.clip(decoded[0, :3].astype(np.float32) / 2 + 0.5, 0.0, 1.0)
    return (image.transpose(1, 2, 0) * 255).round().astype(np.uint8)


def encode_image(pixels: np.ndarray, fmt: ImageFormat, quality: int, max_bytes: int) -> EncodedImage:
    """PNG as is, or JPEG stepping its quality down until the bytes fit ``max_bytes``.

    PNG is written at zlib's default level (about 50 ms for 512x512); Pillow's ``optimize`` costs
    seconds there, so it is tried only when the default does not fit.
    """
    image = Image.fromarray(pixels, mode="RGB")
    if fmt == "png":
        data = _save(image, format="PNG", compress_level=PNG_LEVEL)
        if len(data) > max_bytes:
            data = _save(image, format="PNG", optimize=True)
        if len(data) > max_bytes:
            raise ImageTooLarge(f"the PNG is {len(data)} bytes, over the {max_bytes}-byte limit; "
                                "ask for format jpeg, or raise images.max_bytes")
        return EncodedImage(data, CONTENT_TYPES["png"], "png", None)
    q = quality
    while True:
        data = _save(image, format="JPEG", quality=q, optimize=True)
        if len(data) <= max_bytes:
            return EncodedImage(data, CONTENT_TYPES["jpeg"], "jpeg", q)
        if q <= JPEG_FLOOR:
            raise ImageTooLarge(f"even at JPEG quality {q} the image is {len(data)} bytes, over the "
                                f"{max_bytes}-byte limit; raise images.max_bytes (and the broker's "
                                "max_packet_size)")
        q = max(JPEG_FLOOR, q - JPEG_STEP)


def _save(image: Image.Image, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, **options)
    return buffer.getvalue()
