"""Text to image with Stable Diffusion 1.5 + LCM, as a generator of engine steps.

Each ``next()`` is one piece of work on the device: the text encoder, one UNet step, or the VAE
decoder with the image encoding. The engine interleaves these with other jobs' steps, so chat
keeps streaming while an image is made.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from npu.diffusion.bundle import TimeEmbeddings, find_files
from npu.diffusion.clip_tokenizer import ClipTokenizer
from npu.diffusion.image_encode import encode_image, to_pixels
from npu.diffusion.params import (
    MAX_GUIDANCE,
    DecodedImage,
    ImageFacts,
    ImageOutput,
    ImageParams,
    ImageStep,
    ImageTimings,
)
from npu.diffusion.scheduler import LATENT_SCALE, initial_latents, lcm_denoise, lcm_plan, lcm_renoise
from npu.runtime.base import Session, TensorInfo
from npu.runtime.factory import EXTENSIONS, open_sessions

logger = logging.getLogger(__name__)

LATENT_CHANNELS = 4
VAE_FACTOR = 8


class ImageRequestError(ValueError):
    """A request this model cannot serve (size, steps, guidance); the message lists what it can."""


@dataclass(frozen=True)
class UnetInputs:
    sample: str
    time: str
    text: str


def unet_inputs(inputs: list[TensorInfo]) -> UnetInputs:
    """Tell the UNet's three inputs apart by rank: latent 4-D, text 3-D, time embedding 2-D."""
    by_rank = {len(i.shape): i.name for i in inputs}
    if len(inputs) != 3 or set(by_rank) != {2, 3, 4}:
        shapes = ", ".join(f"{i.name} {list(i.shape)}" for i in inputs)
        raise ValueError(f"the UNet should take a latent, a time embedding and text embeddings; "
                         f"it takes {shapes}")
    return UnetInputs(sample=by_rank[4], time=by_rank[2], text=by_rank[3])


def encode_decoded(image: DecodedImage, params: ImageParams) -> ImageOutput:
    """PNG or JPEG bytes for a decoded picture (raises ``ImageTooLarge`` past ``max_bytes``).

    Host work: the engine runs it on its encoder thread, so the device goes on meanwhile.
    """
    started = time.monotonic()
    encoded = encode_image(to_pixels(image.vae_output), params.format, params.quality, params.max_bytes)
    facts = {f.name: getattr(image, f.name) for f in dataclasses.fields(ImageFacts)}
    facts["timings"] = dataclasses.replace(image.timings, encode_ms=(time.monotonic() - started) * 1e3)
    return ImageOutput(**facts, data=encoded.data, content_type=encoded.content_type, format=encoded.format,
                       quality=encoded.quality)


class DiffusionPipeline:
    def __init__(self, path: Path, backend: str, text_encoder: Session, unet: Session, vae: Session,
                 tokenizer: ClipTokenizer, times: TimeEmbeddings) -> None:
        self.path = path
        self.backend = backend
        self.text_encoder = text_encoder
        self.unet = unet
        self.vae = vae
        self.tokenizer = tokenizer
        self.times = times
        self.names = unet_inputs(unet.get_inputs())
        self.unet_dtypes = {i.name: i.dtype for i in unet.get_inputs()}
        sample = next(i for i in unet.get_inputs() if i.name == self.names.sample)
        self.latent_shape = tuple(int(d) for d in sample.shape)  # type: ignore[arg-type]
        self.height = self.latent_shape[2] * VAE_FACTOR
        self.width = self.latent_shape[3] * VAE_FACTOR
        ids, vae_in = text_encoder.get_inputs()[0], vae.get_inputs()[0]
        self.ids_name, self.ids_dtype = ids.name, ids.dtype
        self.vae_name, self.vae_dtype = vae_in.name, vae_in.dtype
        self.supported_steps = times.supported_steps()

    @classmethod
    def load(cls, path: Path, backend: str = "auto", device_id: int = 0) -> DiffusionPipeline:
        path = Path(path)
        started = time.monotonic()

        def stems(concrete: str) -> list[str]:
            found = find_files(path, EXTENSIONS[concrete])
            models = (found.text_encoder, found.unet, found.vae_decoder)
            return [str(f.relative_to(path).with_suffix("")) for f in models]

        concrete, sessions = open_sessions(path, stems, backend, device_id=device_id)
        files = find_files(path, EXTENSIONS[concrete])
        tokenizer, times = ClipTokenizer.load(files.tokenizer), TimeEmbeddings.load(path)
        pipeline = cls(path, concrete, *sessions, tokenizer, times)
        logger.info("%s: %dx%d, steps %s, %s, loaded in %.1f s", path.name, pipeline.width, pipeline.height,
                    pipeline.supported_steps, concrete, time.monotonic() - started)
        return pipeline

    def close(self) -> None:
        """Unload the three models from the device; the pipeline is unusable afterwards."""
        for session in (self.text_encoder, self.unet, self.vae):
            session.close()

    def warm_up(self) -> None:
        """Each model once, at the fewest steps, after a load (see ``LLMRunner.warm_up``)."""
        for _ in self.generate_steps(ImageParams(prompt="warm up", steps=self.supported_steps[0], seed=0)):
            pass

    @property
    def sizes(self) -> list[str]:
        return [f"{self.width}x{self.height}"]

    def check(self, params: ImageParams) -> None:
        """Refuse at submit what this model cannot make, saying what it can."""
        width = params.width or self.width
        height = params.height or self.height
        if (width, height) != (self.width, self.height):
            raise ImageRequestError(f"size {width}x{height} is not supported by this model; "
                                    f"supported: {', '.join(self.sizes)}")
        if params.steps not in self.supported_steps:
            raise ImageRequestError(f"steps {params.steps} is not supported by this model; "
                                    f"supported: {', '.join(map(str, self.supported_steps))}")
        if not 1.0 <= params.guidance_scale <= MAX_GUIDANCE:
            raise ImageRequestError(f"guidance_scale must be between 1 and {MAX_GUIDANCE:g}")
        if not params.prompt.strip():
            raise ImageRequestError("the prompt is empty")

    def generate_steps(self, params: ImageParams) -> Iterator[ImageStep]:
        """Yield after each piece of device work; the last item carries the decoded picture
        (``encode_decoded`` makes it PNG or JPEG)."""
        self.check(params)
        seed = params.seed if params.seed is not None else 0
        rng = np.random.default_rng(seed)
        plan = lcm_plan(params.steps)
        guided = params.guidance_scale > 1.0
        total = params.steps

        started = time.monotonic()
        prompt = self.tokenizer.encode(params.prompt)
        text = self._encode_text(prompt.ids)
        uncond = self._encode_text(self.tokenizer.encode(params.negative_prompt).ids) if guided else None
        text_ms = (time.monotonic() - started) * 1e3
        yield ImageStep("text", 0, total)

        latents = initial_latents(self.latent_shape, rng)
        unet_ms: list[float] = []
        for i, step in enumerate(plan):
            started = time.monotonic()
            t_emb = self.times.for_timestep(step.timestep)
            noise = self._unet(latents, t_emb, text)
            if uncond is not None:
                free = self._unet(latents, t_emb, uncond)
                noise = free + params.guidance_scale * (noise - free)
            denoised = lcm_denoise(step, noise, latents)  # as lcm_step, keeping the estimate to preview
            latents = denoised if step.last else lcm_renoise(
                step, denoised, rng.standard_normal(latents.shape, dtype=np.float32))
            unet_ms.append((time.monotonic() - started) * 1e3)
            yield ImageStep("unet", i + 1, total, latents=denoised)

        started = time.monotonic()
        decoded = self.vae.run(None, {self.vae_name: (latents / LATENT_SCALE).astype(self.vae_dtype)})[0]
        yield ImageStep("vae", total, total, decoded=DecodedImage(
            width=self.width, height=self.height, seed=seed, steps=total, prompt_tokens=prompt.tokens,
            truncated=prompt.truncated, vae_output=decoded,
            timings=ImageTimings(text_ms, unet_ms, (time.monotonic() - started) * 1e3),
        ))

    def _encode_text(self, ids: np.ndarray) -> np.ndarray:
        return self.text_encoder.run(None, {self.ids_name: ids.astype(self.ids_dtype)})[0].astype(np.float32)

    def _unet(self, latents: np.ndarray, t_emb: np.ndarray, text: np.ndarray) -> np.ndarray:
        feeds = {self.names.sample: latents, self.names.time: t_emb, self.names.text: text}
        typed = {name: value.astype(self.unet_dtypes[name]) for name, value in feeds.items()}
        return self.unet.run(None, typed)[0].astype(np.float32)
