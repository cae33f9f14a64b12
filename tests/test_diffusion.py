"""The SD 1.5 LCM pipeline on the CPU twin: scheduler numbers, tokenizer, images, limits."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sd_factory import CORPUS, build_sd_bundle

from npu.diffusion.clip_tokenizer import ClipTokenizer
from npu.diffusion.image_encode import ImageTooLarge, encode_image
from npu.diffusion.params import ImageParams
from npu.diffusion.pipeline import DiffusionPipeline, ImageRequestError, encode_decoded
from npu.diffusion.scheduler import lcm_denoise, lcm_plan, lcm_renoise, lcm_timesteps


@pytest.fixture(scope="module")
def pipeline(sd_bundle: Path) -> DiffusionPipeline:
    return DiffusionPipeline.load(sd_bundle, backend="onnx")


def generate(pipeline: DiffusionPipeline, **fields: object) -> bytes:
    params = ImageParams(**{"prompt": "a cat wearing sunglasses", "seed": 7, **fields})  # type: ignore[arg-type]
    *_, last = pipeline.generate_steps(params)
    assert last.decoded is not None
    return encode_decoded(last.decoded, params).data


def test_timesteps_match_diffusers_lcm_scheduler() -> None:
    diffusers = pytest.importorskip("diffusers")
    reference = diffusers.LCMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    for steps in range(1, 9):
        reference.set_timesteps(steps)
        assert lcm_timesteps(steps) == reference.timesteps.tolist(), steps
    assert lcm_timesteps(4) == [999, 759, 499, 259], "the steps AXERA's time table was exported for"


def test_each_step_matches_diffusers_lcm_scheduler() -> None:
    diffusers = pytest.importorskip("diffusers")
    torch = pytest.importorskip("torch")
    reference = diffusers.LCMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    reference.set_timesteps(4)
    rng = np.random.default_rng(3)
    sample = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    ref_sample = torch.from_numpy(sample.copy())
    for i, step in enumerate(lcm_plan(4)):
        noise_pred = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
        generator = torch.Generator().manual_seed(i)
        t = reference.timesteps[i]
        out = reference.step(torch.from_numpy(noise_pred), t, ref_sample, generator=generator)
        denoised = lcm_denoise(step, noise_pred, sample)
        np.testing.assert_allclose(denoised, out.denoised.numpy(), rtol=1e-4, atol=1e-5)
        noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(i)).numpy()
        sample = lcm_renoise(step, denoised, noise)
        np.testing.assert_allclose(sample, out.prev_sample.numpy(), rtol=1e-4, atol=1e-5)
        ref_sample = out.prev_sample


def test_clip_tokenizer_matches_transformers(sd_bundle: Path) -> None:
    transformers = pytest.importorskip("transformers")
    folder = sd_bundle / "tokenizer"
    ours = ClipTokenizer.load(folder)
    ref = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                                     pad_token="<|endoftext|>")
    prompts = [*CORPUS, "A CAT   wearing\tSunglasses!!", "pine trees, 8k... (detailed)", "it's the sea's",
               " ".join(CORPUS)]  # the last one is longer than 77 tokens
    for prompt in prompts:
        want = ref(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        assert ours.encode(prompt).ids[0].tolist() == want, prompt
    assert ours.encode(" ".join(CORPUS)).truncated and not ours.encode("a cat").truncated


def test_an_image_is_reproducible_from_its_seed_and_changes_with_seed_and_prompt(
    pipeline: DiffusionPipeline,
) -> None:
    first = generate(pipeline)
    assert generate(pipeline) == first
    assert generate(pipeline, seed=8) != first
    assert generate(pipeline, prompt="a lighthouse in a storm at night") != first
    image = Image.open(io.BytesIO(first))
    assert image.format == "PNG" and image.size == (64, 64) and image.mode == "RGB"
    assert len({hashlib.sha256(generate(pipeline, steps=n)).hexdigest() for n in (1, 2, 4)}) == 3


def test_steps_are_one_engine_step_each(pipeline: DiffusionPipeline) -> None:
    steps = list(pipeline.generate_steps(ImageParams(prompt="rain over the gallery", seed=1, steps=2)))
    assert [(s.stage, s.step, s.steps) for s in steps] == [("text", 0, 2), ("unet", 1, 2), ("unet", 2, 2),
                                                          ("vae", 2, 2)]
    decoded = steps[-1].decoded
    assert decoded is not None and decoded.seed == 1 and decoded.steps == 2
    assert len(decoded.timings.unet_ms) == 2
    assert decoded.vae_output.shape == (1, 3, 64, 64)


def test_what_the_model_cannot_make_is_refused_with_what_it_can(pipeline: DiffusionPipeline, sd_bundle: Path,
                                                               tmp_path: Path) -> None:
    assert pipeline.sizes == ["64x64"] and pipeline.supported_steps == [1, 2, 4]
    with pytest.raises(ImageRequestError, match=r"size 512x512 .* supported: 64x64"):
        pipeline.check(ImageParams(prompt="x", width=512, height=512))
    with pytest.raises(ImageRequestError, match=r"steps 3 .* supported: 1, 2, 4"):
        pipeline.check(ImageParams(prompt="x", steps=3))
    with pytest.raises(ImageRequestError, match="guidance_scale"):
        pipeline.check(ImageParams(prompt="x", guidance_scale=9))
    full = DiffusionPipeline.load(build_sd_bundle(tmp_path / "full", full_time_table=True), backend="onnx")
    assert full.supported_steps == list(range(1, 9)), "a full time table runs any step count"
    assert generate(full, steps=3)


def test_guidance_uses_the_negative_prompt(pipeline: DiffusionPipeline) -> None:
    plain = generate(pipeline)
    assert generate(pipeline, negative_prompt="blurry") == plain, "without guidance it has no effect"
    guided = generate(pipeline, guidance_scale=2.0, negative_prompt="blurry")
    assert guided != plain and guided != generate(pipeline, guidance_scale=2.0, negative_prompt="neon")


def test_jpeg_steps_its_quality_down_to_fit_and_refuses_what_cannot() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)  # noise: the hardest case
    roomy = encode_image(pixels, "jpeg", 95, 10_000_000)
    assert roomy.quality == 95 and roomy.content_type == "image/jpeg"
    fitted = encode_image(pixels, "jpeg", 95, len(roomy.data) // 2)
    assert fitted.quality is not None and fitted.quality < 95 and len(fitted.data) <= len(roomy.data) // 2
    with pytest.raises(ImageTooLarge, match="even at JPEG quality 40"):
        encode_image(pixels, "jpeg", 95, 1000)
    with pytest.raises(ImageTooLarge, match="ask for format jpeg"):
        encode_image(pixels, "png", 90, 1000)


def test_the_warm_up_after_a_load_changes_no_picture(sd_bundle: Path) -> None:
    cold = DiffusionPipeline.load(sd_bundle, backend="onnx")
    warm = DiffusionPipeline.load(sd_bundle, backend="onnx")
    warm.warm_up()
    assert generate(warm) == generate(cold)
