"""A cheap look at a picture while it is made: the latent projected to RGB by a fixed 4x3 matrix.

No extra model: AUTOMATIC1111's "Approx cheap" preview (``modules/sd_vae_approx.py``,
``cheap_approximation``) multiplies SD 1.x's four latent channels by this matrix (the fit from the
Hugging Face forum thread it cites), and ``modules/sd_samplers_common.py`` maps the result from
[-1, 1] to [0, 1]. The latent is 1/8 of the picture's size (64x64 for 512x512), so the projection
costs microseconds; the JPEG is scaled to ``size`` pixels on its longer side.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# Rows: latent channels 0-3; columns: R, G, B (SD 1.x; AUTOMATIC1111's values).
LATENT_RGB = np.array([
    [0.298, 0.207, 0.208],
    [0.187, 0.286, 0.173],
    [-0.158, 0.189, 0.264],
    [-0.184, -0.271, -0.473],
], dtype=np.float32)
DEFAULT_SIZE = 256
PREVIEW_QUALITY = 70


def latent_to_rgb(latents: np.ndarray) -> np.ndarray:
    """NCHW latents (the first picture of the batch) -> HWC uint8 RGB at the latent's size."""
    sample = latents[0, :4].astype(np.float32)
    rgb = np.einsum("lhw,lr->hwr", sample, LATENT_RGB)
    return (np.clip((rgb + 1.0) / 2.0, 0.0, 1.0) * 255).round().astype(np.uint8)


def preview_jpeg(latents: np.ndarray, size: int = DEFAULT_SIZE, quality: int = PREVIEW_QUALITY) -> bytes:
    """A JPEG preview of ``latents``, ``size`` pixels on its longer side."""
    image = Image.fromarray(latent_to_rgb(latents), mode="RGB")
    width, height = image.size
    scale = size / max(width, height)
    shape = (max(1, round(width * scale)), max(1, round(height * scale)))
    image = image.resize(shape, Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
