"""Request bodies of the image routes: OpenAI's ``images/generations`` and AUTOMATIC1111's ``txt2img``."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from npu.diffusion.params import SEED_BOUND
from npu.validation import bounded

SIZE = re.compile(r"^(\d{1,4})x(\d{1,4})$")


class ImageGenerationRequest(BaseModel):
    """OpenAI's fields, plus ``seed``, ``steps``, ``negative_prompt`` and ``guidance_scale``."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    prompt: str = Field(..., min_length=1, max_length=4000)
    model: str | None = None
    n: int = Field(1, ge=1, le=10)
    size: str | None = Field(None, description="WxH, or auto for the model's size")
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: Literal["png", "jpeg"] = "png"
    output_compression: int | None = Field(None, ge=0, le=100, description="JPEG quality")
    quality: str | None = None  # OpenAI's standard/hd/auto: one quality here; accepted and ignored
    style: str | None = None
    seed: Annotated[int | None, bounded(SEED_BOUND)] = None  # -1: random
    steps: int | None = Field(None, ge=1, le=8)
    negative_prompt: str = ""
    guidance_scale: float = Field(1.0, ge=1.0, le=4.0)

    @field_validator("size")
    @classmethod
    def _size(cls, value: str | None) -> str | None:
        if value is None or value == "auto" or SIZE.match(value):
            return value
        raise ValueError(f"size must be WxH (e.g. 512x512) or auto, not {value!r}")

    def dimensions(self) -> tuple[int | None, int | None]:
        match = SIZE.match(self.size or "")
        return (int(match[1]), int(match[2])) if match else (None, None)


class Txt2ImgRequest(BaseModel):
    """AUTOMATIC1111's ``/sdapi/v1/txt2img`` fields this pipeline uses; the rest are ignored.

    ``cfg_scale`` is ignored: LCM is distilled without classifier-free guidance, and A1111's
    default of 7 would ruin its pictures; ``sampler_name`` is always LCM.
    """

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    prompt: str = Field(..., min_length=1, max_length=4000)
    negative_prompt: str = ""
    seed: int = Field(-1, ge=-1, le=2**32 - 1, description="-1: random")
    steps: int | None = Field(None, ge=1, le=150)
    width: int | None = Field(None, ge=8, le=4096)
    height: int | None = Field(None, ge=8, le=4096)
    batch_size: int = Field(1, ge=1, le=10)
    n_iter: int = Field(1, ge=1, le=10)
    cfg_scale: float | None = None
    sampler_name: str | None = None
