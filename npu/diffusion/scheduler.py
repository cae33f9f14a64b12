"""The Latent Consistency Model scheduler, as pure numpy functions.

The numbers follow the LCM paper's discrete scheduler as Stable Diffusion 1.5 was trained:
1000 steps, a "scaled linear" beta schedule from 0.00085 to 0.012, epsilon prediction, and the
50-step "original" schedule that LCM distillation skips through. For 4 steps the timesteps are
999, 759, 499, 259: the ones AXERA's compiled bundle has time embeddings for.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TRAIN_STEPS = 1000
ORIGINAL_STEPS = 50
BETA_START = 0.00085
BETA_END = 0.012
TIMESTEP_SCALING = 10.0
SIGMA_DATA = 0.5
LATENT_SCALE = 0.18215  # SD 1.5's VAE scaling factor
MIN_STEPS, MAX_STEPS = 1, 8


def alphas_cumprod(train_steps: int = TRAIN_STEPS) -> np.ndarray:
    betas = np.linspace(BETA_START**0.5, BETA_END**0.5, train_steps, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def lcm_timesteps(
    steps: int, original_steps: int = ORIGINAL_STEPS, train_steps: int = TRAIN_STEPS
) -> list[int]:
    """The timesteps of a ``steps``-step LCM run, highest first (999, 759, 499, 259 for 4)."""
    if not MIN_STEPS <= steps <= original_steps:
        raise ValueError(f"steps must be between {MIN_STEPS} and {original_steps}, not {steps}")
    k = train_steps // original_steps
    origin = (np.arange(1, original_steps + 1) * k - 1)[::-1]
    picks = np.floor(np.linspace(0, original_steps, num=steps, endpoint=False)).astype(np.int64)
    return [int(t) for t in origin[picks]]


@dataclass(frozen=True)
class LcmStep:
    """Coefficients of one step, so the step itself is two multiply-adds."""

    timestep: int
    last: bool
    c_skip: float
    c_out: float
    sqrt_alpha: float
    sqrt_beta: float
    sqrt_alpha_prev: float
    sqrt_beta_prev: float


def lcm_plan(steps: int) -> list[LcmStep]:
    ac = alphas_cumprod()
    timesteps = lcm_timesteps(steps)
    plan = []
    for i, t in enumerate(timesteps):
        last = i == len(timesteps) - 1
        prev = timesteps[i + 1] if not last else t
        a, a_prev = ac[t], ac[prev] if prev >= 0 else 1.0
        scaled = t * TIMESTEP_SCALING
        plan.append(LcmStep(
            timestep=t, last=last,
            c_skip=SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2),
            c_out=scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5,
            sqrt_alpha=float(np.sqrt(a)), sqrt_beta=float(np.sqrt(1 - a)),
            sqrt_alpha_prev=float(np.sqrt(a_prev)), sqrt_beta_prev=float(np.sqrt(1 - a_prev)),
        ))
    return plan


def lcm_denoise(step: LcmStep, noise_pred: np.ndarray, sample: np.ndarray) -> np.ndarray:
    """The consistency function's estimate of the clean latent."""
    original = (sample - step.sqrt_beta * noise_pred) / step.sqrt_alpha
    return (step.c_out * original + step.c_skip * sample).astype(np.float32)


def lcm_renoise(step: LcmStep, denoised: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """The estimate noised again to the next timestep (the last step keeps the estimate)."""
    if step.last:
        return denoised
    return (step.sqrt_alpha_prev * denoised + step.sqrt_beta_prev * noise).astype(np.float32)


def lcm_step(
    step: LcmStep, noise_pred: np.ndarray, sample: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    denoised = lcm_denoise(step, noise_pred, sample)
    if step.last:
        return denoised
    return lcm_renoise(step, denoised, rng.standard_normal(sample.shape, dtype=np.float32))


def initial_latents(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Pure noise (LCM's initial sigma is 1)."""
    return rng.standard_normal(shape, dtype=np.float32)
