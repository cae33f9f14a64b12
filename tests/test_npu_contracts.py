"""The card's contracts, proven on the simulated PyAXEngine (tests/fake_axengine.py).

The fake declares shape groups the way AXERA's compiled models vary (a first-chunk placeholder of
``(1, 1, hidden)``, several decode groups with group 0 not the smallest, prefill groups before
decode ones, bf16 or fp32) and enforces PyAXEngine's own assertions, so the runner passes only
if it reads what the runtime declares.
"""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path

import fake_axengine as fa
import numpy as np
import pytest
import yaml

from appliance.cli import main
from npu.device.base import DeviceFault
from npu.diffusion.image_encode import to_pixels
from npu.llm.params import GenerationParams
from npu.llm.runner import LLMRunner
from npu.llm.shape_groups import BundleShapeError
from npu.runtime import NpuUnavailableError
from npu.runtime.axengine_backend import AxEngineSession, capture_prints

PROMPT = "Name three things a lighthouse keeper does at night, and why."
LONG = "Summarise: " + " ".join(f"Room {i} holds a painting of the sea at hour {i % 12}." for i in range(14))
LAYOUTS = {
    # AXERA's Qwen2.5 scripts feed the first chunk's history as (1, 1, hidden_size).
    "placeholder-hidden": fa.Layout(decode=(2047,), placeholder="hidden", dtype="float32"),
    # Two contexts, the small one declared last; prefill groups first (group 0 is a prefill group).
    "two-decode-groups": fa.Layout(decode=(2047, 192), prefill=(0, 128, 256, 384), dtype="float32",
                                   decode_first=False),
    # As the card runs it: bf16 everywhere, a hidden-sized placeholder.
    "bf16": fa.Layout(decode=(1023,), placeholder="hidden"),
}


@pytest.fixture(scope="module")
def npu_bundles(demo_bundle_fp32: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("npu")
    bundles = {name: fa.make_npu_bundle(demo_bundle_fp32, root / name, lay) for name, lay in LAYOUTS.items()}
    bundles["broken"] = fa.make_npu_bundle(demo_bundle_fp32, root / "broken", fa.Layout(kv_dim=576))
    return bundles


@pytest.fixture(scope="module")
def twin_text(demo_bundle_fp32: Path) -> dict[str, str]:
    """The CPU twin's greedy answers, as ``appliance chat --backend onnx`` prints them."""
    out: dict[str, str] = {}
    for prompt in (PROMPT, LONG):
        lines: list[str] = []

        def keep(text: str, lines: list[str] = lines) -> int:
            lines.append(text)
            return len(text)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(sys.stdout, "write", keep)
            assert main(["chat", "--model", str(demo_bundle_fp32), "--backend", "onnx",
                         "--max-tokens", "24", "--temperature", "0", prompt]) == 0
        out[prompt] = "".join(lines)
    return out


@pytest.fixture
def card(monkeypatch: pytest.MonkeyPatch) -> fa.Card:
    """A fake ``axengine`` in ``sys.modules`` over one simulated card (bus id 1)."""
    card = fa.Card()
    monkeypatch.setitem(sys.modules, "axengine", fa.make_module(card=card))
    return card


def record() -> fa.Record:
    return sys.modules["axengine"].record  # type: ignore[no-any-return]


def chat(bundle: Path, backend: str, prompt: str, capsys: pytest.CaptureFixture[str]) -> str:
    argv = ["chat", "--model", str(bundle), "--backend", backend, "--max-tokens", "24",
            "--temperature", "0", prompt]
    assert main(argv) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_chat_on_the_card_gives_the_twins_greedy_text(
    layout: str, npu_bundles: dict[str, Path], twin_text: dict[str, str], card: fa.Card,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for prompt in (PROMPT, LONG):
        npu = chat(npu_bundles[layout], "axengine", prompt, capsys)
        assert npu == twin_text[prompt] and npu.strip()
        assert "[INFO]" not in npu, "PyAXEngine's prints stay out of the answer"
    used = {g for name, g in record().runs if "_post" not in name}
    if layout == "two-decode-groups":
        # LONG is 180-odd tokens: its decode outgrows the 192-row group (5) into the 2047 one (4).
        assert {0, 1, 4, 5} <= used
    else:
        assert {0, 1, 2} <= used


def test_the_fake_runtime_is_as_strict_as_pyaxengine(npu_bundles: dict[str, Path], card: fa.Card) -> None:
    axengine = sys.modules["axengine"]
    layer0 = npu_bundles["placeholder-hidden"] / "llama_p128_l0_together.axmodel"
    sess = axengine.InferenceSession(str(layer0))
    count = len(LAYOUTS["placeholder-hidden"].groups(576, 192))
    with pytest.raises(IndexError):
        sess.get_inputs(count)  # the off-by-one of _base_session.py
    with pytest.raises(ValueError):
        sess.get_inputs(count + 1)
    prefill = {n.name: np.zeros(n.shape, n.dtype) for n in sess.get_inputs(1)}
    assert prefill["K_cache"].shape == (1, 1, 576)
    wrong = {**prefill, "K_cache": np.zeros((1, 1, 192), np.float32)}  # what the runner used to feed
    with pytest.raises(AssertionError, match=r"expect shape \[1, 1, 576\]"):
        sess.run(None, wrong, shape_group=1)
    with pytest.raises(ValueError):
        sess.run(["output"], prefill, shape_group=1)  # a subset of output names
    with pytest.raises(ValueError, match="missing"):
        sess.run(None, {"input": prefill["input"]}, shape_group=1)
    assert len(sess.run(None, prefill, shape_group=1)) == 3


def test_a_subset_of_outputs_is_picked_by_name(npu_bundles: dict[str, Path], card: fa.Card) -> None:
    sess = AxEngineSession(npu_bundles["bf16"] / "llama_p128_l0_together.axmodel")
    feeds = {t.name: np.zeros(t.shape, t.dtype) for t in sess.get_inputs(0)}  # type: ignore[arg-type]
    full = sess.run(None, feeds)
    (only,) = sess.run(["output"], feeds)
    assert only.shape == (1, 1, 576) and np.array_equal(only, full[2])
    assert sess.group_count == 1 + 1023 // 128


def test_a_bundle_whose_shapes_cannot_work_is_refused_by_name(
    npu_bundles: dict[str, Path], card: fa.Card, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(BundleShapeError) as err:
        LLMRunner.load(npu_bundles["broken"], backend="axengine")
    said = str(err.value)
    assert "llama_p128_l0_together.axmodel" in said and "K_cache" in said
    assert "(1, 1023, 576)" in said and "(1, 1023, 192)" in said
    assert card.cmm_used == 0, "the sessions opened before the refusal are unloaded"
    config = tmp_path / "appliance.yaml"
    models = [{"id": "bad", "path": str(npu_bundles["broken"]), "runtime": "axengine"},
              {"id": "good", "path": str(npu_bundles["two-decode-groups"]), "runtime": "axengine"}]
    config.write_text(yaml.safe_dump({"device": {"backend": "sim"}, "models": models}))
    assert main(["check", "-c", str(config)]) == 1
    out = capsys.readouterr().out
    assert "CANNOT RUN" in out and "declares K_cache (1, 1023, 576)" in out
    assert "decode 192 rows (group 5), 2047 rows (group 4)" in out
    assert "prefill 4 groups of 128 tokens with 0..384 rows of history" in out
    assert "(first-chunk placeholder 1x1x192)" in out


def test_auto_without_a_card_runs_on_the_cpu_and_axengine_says_what_to_check(
    npu_bundles: dict[str, Path], demo_bundle_fp32: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str],
) -> None:
    both = tmp_path / "both"
    both.mkdir()
    for folder in (demo_bundle_fp32, npu_bundles["bf16"]):
        for item in folder.iterdir():
            if not (both / item.name).exists():
                (both / item.name).symlink_to(item)
    monkeypatch.setitem(sys.modules, "axengine", fa.make_module(card=fa.Card(ids=[])))
    with caplog.at_level(logging.WARNING):
        runner = LLMRunner.load(both, backend="auto")
    assert runner.backend == "onnx"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no card answers" in warnings[0] and "on the CPU" in warnings[0]
    with pytest.raises(NpuUnavailableError, match="lspci"):
        LLMRunner.load(both, backend="axengine")
    monkeypatch.setitem(sys.modules, "axengine", fa.make_module(card=fa.Card(driver_loaded=False)))
    assert main(["chat", "--model", str(both), "--backend", "axengine", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "driver loaded" in err


def test_closing_a_runner_frees_the_cards_memory(npu_bundles: dict[str, Path], card: fa.Card) -> None:
    runner = LLMRunner.load(npu_bundles["bf16"], backend="axengine")
    held = card.cmm_used
    assert held > 0
    runner.close()
    assert card.cmm_used == 0
    for _ in range(2):  # reload cycles do not add up
        LLMRunner.load(npu_bundles["bf16"], backend="axengine").close()
    assert card.cmm_used == 0


def test_a_failed_execution_is_a_device_fault(npu_bundles: dict[str, Path], card: fa.Card) -> None:
    runner = LLMRunner.load(npu_bundles["bf16"], backend="axengine")
    card.fault = "dead"
    with pytest.raises(DeviceFault, match="axclrtEngineExecute failed"):
        runner.generate(runner.encode("hi"), GenerationParams(max_tokens=2, temperature=0.0))


def test_prints_are_kept_from_the_loading_thread_only(capsys: pytest.CaptureFixture[str]) -> None:
    inside, other_done = threading.Event(), threading.Event()

    def other() -> None:
        inside.wait(5)
        print("from another thread")
        other_done.set()

    thread = threading.Thread(target=other)
    thread.start()
    with capture_prints() as lines:
        print("[INFO] SOC Name: AX650N")
        inside.set()
        other_done.wait(5)
    thread.join()
    out = capsys.readouterr().out
    assert "from another thread" in out and "SOC Name" not in out
    assert "SOC Name" in "".join(lines)


def test_a_four_channel_vae_output_becomes_rgb() -> None:
    decoded = np.zeros((1, 4, 8, 8), np.float32)
    decoded[0, 3] = 1.0  # the extra channel must not leak into the picture
    pixels = to_pixels(decoded)
    assert pixels.shape == (8, 8, 3) and (pixels == 128).all()
