"""The sd1.5-lcm bundle layout (AXERA's, followed by the CPU twin with ``.onnx`` files).

```
<bundle>/
  text_encoder/<name>.axmodel|.onnx     input_ids [1, 77] -> last_hidden_state [1, 77, 768]
  unet.axmodel|.onnx                    latent [1, 4, H/8, W/8], time embedding [1, 1280],
                                        encoder_hidden_states [1, 77, 768] -> noise [1, 4, H/8, W/8]
  vae_decoder.axmodel|.onnx             latent / 0.18215 -> image [1, 3, H, W] in [-1, 1]
  tokenizer/vocab.json, merges.txt      CLIP's tokenizer
  time_input_txt2img.npy                the UNet's time embedding for 999, 759, 499, 259
  time_embeddings.npy                   (optional) one row per training timestep, 0..999
```

The compiled UNet takes the time embedding rather than the timestep: the embedding MLP ran at
export time for the 4-step schedule only. A bundle with the full table (the CPU twin's) runs any
step count from 1 to 8; AXERA's runs those whose timesteps are all in its 4 rows (1, 2 and 4).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from npu.diffusion.scheduler import MAX_STEPS, MIN_STEPS, lcm_timesteps

TXT2IMG_TABLE = "time_input_txt2img.npy"
FULL_TABLE = "time_embeddings.npy"
TXT2IMG_STEPS = 4


@dataclass(frozen=True)
class BundleFiles:
    text_encoder: Path
    unet: Path
    vae_decoder: Path
    tokenizer: Path


def find_files(bundle: Path, extension: str) -> BundleFiles:
    encoders = sorted((bundle / "text_encoder").glob(f"*{extension}"))
    encoders = encoders or sorted(bundle.glob(f"text_encoder{extension}"))
    missing = []
    if not encoders:
        missing.append(f"text_encoder/*{extension}")
    for name in ("unet", "vae_decoder"):
        if not (bundle / f"{name}{extension}").is_file():
            missing.append(f"{name}{extension}")
    for name in ("vocab.json", "merges.txt"):
        if not (bundle / "tokenizer" / name).is_file():
            missing.append(f"tokenizer/{name}")
    if not any((bundle / table).is_file() for table in (TXT2IMG_TABLE, FULL_TABLE)):
        missing.append(TXT2IMG_TABLE)
    if missing:
        raise FileNotFoundError(f"{bundle} is not an sd1.5-lcm bundle: it lacks {', '.join(missing)}")
    return BundleFiles(encoders[0], bundle / f"unet{extension}", bundle / f"vae_decoder{extension}",
                       bundle / "tokenizer")


class TimeEmbeddings:
    """The UNet's time-embedding input, by timestep."""

    def __init__(self, rows: dict[int, np.ndarray]) -> None:
        self.rows = rows

    @classmethod
    def load(cls, bundle: Path) -> TimeEmbeddings:
        full = bundle / FULL_TABLE
        if full.is_file():
            table = np.load(full).astype(np.float32)
            return cls({t: table[t] for t in range(table.shape[0])})
        txt2img = bundle / TXT2IMG_TABLE
        if not txt2img.is_file():
            raise FileNotFoundError(f"{bundle} lacks {TXT2IMG_TABLE} (the UNet's time embeddings)")
        table = np.load(txt2img).astype(np.float32).reshape(TXT2IMG_STEPS, -1)
        return cls(dict(zip(lcm_timesteps(TXT2IMG_STEPS), table, strict=True)))

    def supported_steps(self) -> list[int]:
        return [n for n in range(MIN_STEPS, MAX_STEPS + 1) if all(t in self.rows for t in lcm_timesteps(n))]

    def for_timestep(self, t: int) -> np.ndarray:
        return self.rows[t][None, :]
