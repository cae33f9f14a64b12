"""scripts/fetch_models against a simulated hub: pinned revisions, the bundle contract, the config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from appliance.config import load_config
from appliance.fetch.catalog import CATALOG, ChatSource, ImageSource, SpeechSource, find_entry
from appliance.fetch.config_entries import merge_models, model_entry
from appliance.fetch.layout import EMBED_FILE, bundle_config

ROOT = Path(__file__).resolve().parents[1]
FAKE_HF = Path(__file__).with_name("fake_hf.py")
DEMO_TOKENIZER = ROOT / "models" / "smollm2-135m-instruct" / "tokenizer.json"

QWEN3_06B = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 1024,
             "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
             "vocab_size": 151936, "eos_token_id": 151645, "bos_token_id": 151643, "rope_theta": 1000000}

CONFIG_TEXT = """\
# The installer's notes stay where they are.
mqtt:
  base_topic: north   # gallery north
models:
  - id: smollm2-135m-instruct
    kind: chat
    path: models/smollm2-135m-instruct
    default: true
telemetry:
  interval: 5         # dashboards want it fast
"""
SIM_CARD = "device:\n  backend: sim\n  sim: {cmm_total_mib: 7040, cmm_used_mib: 0}\n"


def _put(tree: Path, name: str, data: bytes | str = b"\0" * 64, size: int | None = None) -> None:
    path = tree / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if size is not None:
        with path.open("wb") as fh:
            fh.truncate(size)  # sparse: the real size, no disk
    else:
        path.write_bytes(data.encode() if isinstance(data, str) else data)


def build_hub(root: Path, model_id: str, embed_size: int | None = None, layer_size: int = 64) -> None:
    """The files of one catalog entry, at its pinned revisions, as the hub would serve them."""
    entry = find_entry(model_id)
    source = entry.source
    if isinstance(source, ChatSource):
        up = root / source.upstream.repo / source.upstream.revision
        _put(up, "config.json", json.dumps(QWEN3_06B))
        _put(up, "generation_config.json", json.dumps({"eos_token_id": [151645, 151643]}))
        _put(up, "tokenizer.json", DEMO_TOKENIZER.read_bytes())
        _put(up, "tokenizer_config.json", json.dumps({"chat_template": "{{ messages }}"}))
        compiled = root / source.compiled.repo / source.compiled.revision / source.compiled.folder
        for i in range(QWEN3_06B["num_hidden_layers"]):
            _put(compiled, f"{source.prefix}_p128_l{i}_together.axmodel", size=layer_size)
        _put(compiled, f"{source.prefix}_post.axmodel", size=layer_size)
        want = QWEN3_06B["vocab_size"] * QWEN3_06B["hidden_size"] * 2
        _put(compiled, EMBED_FILE, size=want if embed_size is None else embed_size)
        _put(compiled.parent if source.compiled.folder else compiled, "config.json", "{}")  # AXERA's own
    else:
        assert isinstance(source, ImageSource | SpeechSource)
        compiled = root / source.compiled.repo / source.compiled.revision / source.compiled.folder
        for name in source.files:
            _put(compiled, name)


def fetch_models(tmp_path: Path, hub: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FAKE_HF_ROOT": str(hub), "APPLIANCE_HF_COMMAND": str(FAKE_HF),
           "APPLIANCE_PREFIX": str(tmp_path / "not-installed")}
    return subprocess.run(
        [str(ROOT / "scripts" / "fetch_models"), "--models-dir", str(tmp_path / "models"),
         "--config", str(tmp_path / "appliance.yaml"), *args],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )


@pytest.fixture
def hub(tmp_path: Path) -> Path:
    root = tmp_path / "hub"
    root.mkdir()
    (root / "calls.jsonl").touch()
    return root


def calls(hub: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (hub / "calls.jsonl").read_text().splitlines()]


def test_a_chat_model_becomes_a_bundle_and_a_config_entry(tmp_path: Path, hub: Path) -> None:
    build_hub(hub, "qwen3-0.6b", layer_size=40 << 20)
    config_text = CONFIG_TEXT.replace("path: models/smollm2", f"path: {ROOT}/models/smollm2") + SIM_CARD
    (tmp_path / "appliance.yaml").write_text(config_text)
    result = fetch_models(tmp_path, hub, "qwen3-0.6b", "--default", "qwen3-0.6b")
    assert result.returncode == 0, result.stderr

    entry = find_entry("qwen3-0.6b")
    assert isinstance(entry.source, ChatSource)
    made = calls(hub)
    assert [(c["repo"], c["revision"]) for c in made] == [
        (entry.source.upstream.repo, entry.source.upstream.revision),
        (entry.source.compiled.repo, entry.source.compiled.revision),
    ], "both repositories are fetched at their pinned commits, never a branch"
    assert len(made[1]["files"]) == 28 + 2, "exactly the 28 layers, the post model and the embeddings"

    bundle = tmp_path / "models" / "qwen3-0.6b"
    config = json.loads((bundle / "config.json").read_text())
    assert config["num_hidden_layers"] == 28 and config["eos_token_id"] == [151645, 151643]
    layer = bundle / "qwen3_p128_l27_together.axmodel"
    assert layer.is_symlink() and not os.path.isabs(os.readlink(layer)), "relative links: models/ can move"
    assert layer.resolve().is_relative_to((tmp_path / "models" / ".hub").resolve())
    assert (bundle / "tokenizer.json").read_bytes() == DEMO_TOKENIZER.read_bytes()
    assert json.loads((bundle / "SOURCE.json").read_text())["sources"]["compiled"]["revision"] == \
        entry.source.compiled.revision
    assert not list((tmp_path / "models").glob(".*partial")), "no staging folder is left behind"

    text = (tmp_path / "appliance.yaml").read_text()
    assert "# The installer's notes stay where they are." in text and "# dashboards want it fast" in text
    assert (tmp_path / "appliance.yaml.bak").read_text() == config_text
    loaded = load_config(tmp_path / "appliance.yaml", env={})
    ids = [(m.id, m.default) for m in loaded.models]
    assert ids == [("smollm2-135m-instruct", False), ("qwen3-0.6b", True)]
    assert loaded.telemetry.interval == 5 and loaded.mqtt.base_topic == "north"
    assert loaded.model_path(loaded.models[1]).resolve() == bundle.resolve()

    check = subprocess.run(
        [sys.executable, "-m", "appliance", "check", "-c", str(tmp_path / "appliance.yaml")],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"model      qwen3-0.6b (chat, runtime auto, default): {bundle}: ok" in check.stdout
    # 28 layers of 40 MiB and a 40 MiB post model on the card; the 297 MiB embeddings stay on the host.
    assert "qwen3-0.6b 1160" in check.stdout and "of 7040 MiB" in check.stdout, check.stdout

    again = fetch_models(tmp_path, hub, "qwen3-0.6b")
    assert again.returncode == 0, again.stderr
    models = yaml.safe_load((tmp_path / "appliance.yaml").read_text())["models"]
    assert [m["id"] for m in models] == ["smollm2-135m-instruct", "qwen3-0.6b"], "a re-fetch replaces it"


def test_compiled_files_from_another_model_are_refused(tmp_path: Path, hub: Path) -> None:
    build_hub(hub, "qwen3-0.6b", embed_size=151936 * 896 * 2)  # Qwen2.5-0.5B's embeddings
    (tmp_path / "appliance.yaml").write_text(CONFIG_TEXT)
    result = fetch_models(tmp_path, hub, "qwen3-0.6b")
    assert result.returncode == 2
    assert "vocab_size x hidden_size x 2" in result.stderr and "different models" in result.stderr
    assert not (tmp_path / "models" / "qwen3-0.6b").exists()
    assert not list((tmp_path / "models").glob(".*partial"))
    assert (tmp_path / "appliance.yaml").read_text() == CONFIG_TEXT, "a failed fetch leaves the config alone"


def test_a_missing_upstream_file_names_the_repository(tmp_path: Path, hub: Path) -> None:
    build_hub(hub, "qwen3-0.6b")
    entry = find_entry("qwen3-0.6b")
    assert isinstance(entry.source, ChatSource)
    compiled = hub / entry.source.compiled.repo / entry.source.compiled.revision
    (compiled / "qwen3_p128_l5_together.axmodel").unlink()
    result = fetch_models(tmp_path, hub, "qwen3-0.6b")
    assert result.returncode == 2
    assert "AXERA-TECH/Qwen3-0.6B" in result.stderr and "qwen3_p128_l5_together.axmodel" in result.stderr


def test_the_image_model_keeps_its_folders(tmp_path: Path, hub: Path) -> None:
    build_hub(hub, "sd15-lcm")
    result = fetch_models(tmp_path, hub, "sd15-lcm")
    assert result.returncode == 0, result.stderr
    bundle = tmp_path / "models" / "sd15-lcm"
    assert (bundle / "text_encoder" / "sd15_text_encoder_sim.axmodel").is_file()
    assert (bundle / "tokenizer" / "vocab.json").is_file() and (bundle / "unet.axmodel").is_file()
    entry = yaml.safe_load((tmp_path / "appliance.yaml").read_text())["models"][0]
    assert entry == {"id": "sd15-lcm", "kind": "image", "path": "models/sd15-lcm", "runtime": "auto"}
    command = [sys.executable, "-m", "appliance", "check", "-c", str(tmp_path / "appliance.yaml")]
    check = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert f"model      sd15-lcm (image, runtime auto): {bundle}: ok" in check.stdout, check.stdout
    (bundle / "unet.axmodel").unlink()
    check = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert check.returncode == 1 and "NOT AN IMAGE BUNDLE" in check.stdout and "unet.axmodel" in check.stdout


def test_axeras_speech_models_arrive_in_the_layout_their_runners_load(
        tmp_path: Path, hub: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub serves AXERA's files at the pinned commits (here: tiny graphs with Whisper's and
    SenseVoice's IO, tests/test_axera_speech.py); the fetched folders transcribe on the simulated card."""
    import fake_axengine as fa
    from test_axera_speech import make_folder, make_sensevoice

    from npu.speech.transcribers import load_transcriber

    for model_id, make in (("whisper-tiny-ax650", make_folder), ("sensevoice-ax650", make_sensevoice)):
        source = find_entry(model_id).source
        assert isinstance(source, SpeechSource) and source.kind == "stt"
        make(hub / source.compiled.repo / source.compiled.revision / source.compiled.folder)
    result = fetch_models(tmp_path, hub, "whisper-tiny-ax650", "sensevoice-ax650")
    assert result.returncode == 0, result.stderr
    whisper, sensevoice = tmp_path / "models" / "whisper-tiny-ax650", tmp_path / "models" / "sensevoice-ax650"
    assert sorted(p.name for p in whisper.iterdir()) == sorted(["SOURCE.json", "tiny-encoder.axmodel",
                                                                "tiny-decoder.axmodel", "tiny-tokens.txt",
                                                                "tiny_config.json"])
    assert [(c["repo"], c["revision"]) for c in calls(hub)] == [
        ("AXERA-TECH/Whisper", "143121c8a628bbb463bf4e19e8e7711dd2192e27"),
        ("AXERA-TECH/SenseVoice", "6ef7cf855a8f1661c29e2015abdb628e9258fa98")]
    models = yaml.safe_load((tmp_path / "appliance.yaml").read_text())["models"]
    assert [(m["id"], m["kind"]) for m in models] == [("whisper-tiny-ax650", "stt"),
                                                      ("sensevoice-ax650", "stt")]
    command = [sys.executable, "-m", "appliance", "check", "-c", str(tmp_path / "appliance.yaml")]
    check = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert f"model      whisper-tiny-ax650 (stt, runtime auto): {whisper}: ok" in check.stdout, check.stdout
    assert "served on the card (not here:" in check.stdout

    monkeypatch.setitem(sys.modules, "axengine", fa.make_module())
    tone = np.sin(np.arange(32000) / 16000 * 2 * np.pi * 440).astype(np.float32) * 0.3
    assert [s.text for s in load_transcriber(whisper, "axengine").transcribe_steps(tone, "en")] == [
        "Hello art lovers!"]
    second = tone[:16000]
    assert [s.text for s in load_transcriber(sensevoice, "axengine").transcribe_steps(second, "en")] == [
        "Hello art lovers"]
    (whisper / "tiny-decoder.axmodel").unlink()
    check = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert check.returncode == 1 and "NOT A SPEECH MODEL" in check.stdout


def test_kokoro_arrives_flat_and_speaks_on_the_simulated_card(
        tmp_path: Path, hub: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fake_axengine as fa
    from test_axera_kokoro import make_kokoro

    from npu.speech.voices import load_voice

    source = find_entry("kokoro-ax650").source
    assert isinstance(source, SpeechSource) and source.kind == "tts"
    made = make_kokoro(tmp_path / "made")
    tree = hub / source.compiled.repo / source.compiled.revision
    for repo_file in source.files:
        _put(tree, repo_file, (made / Path(repo_file).name).read_bytes())
    result = fetch_models(tmp_path, hub, "kokoro-ax650")
    assert result.returncode == 0, result.stderr
    bundle = tmp_path / "models" / "kokoro-ax650"
    command = [sys.executable, "-m", "appliance", "check", "-c", str(tmp_path / "appliance.yaml")]
    check = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert f"model      kokoro-ax650 (tts, runtime auto): {bundle}: ok" in check.stdout, check.stdout
    assert "served on the card (not here:" in check.stdout
    monkeypatch.setitem(sys.modules, "axengine", fa.make_module())
    voice = load_voice(bundle, "axengine")
    (piece,) = voice.speak_steps("Welcome to the gallery.")
    assert piece.rate == 24000 and len(piece.pcm) > 0


def test_list_unknown_ids_and_a_missing_cli_are_explained(tmp_path: Path, hub: Path) -> None:
    listing = fetch_models(tmp_path, hub, "--list")
    assert listing.returncode == 0
    for entry in CATALOG:
        assert entry.id in listing.stdout and entry.source.compiled.revision[:12] in listing.stdout
    unknown = fetch_models(tmp_path, hub, "qwen9-huge")
    assert unknown.returncode == 2 and "qwen9-huge" in unknown.stderr and "qwen3-0.6b" in unknown.stderr
    env = {**os.environ, "APPLIANCE_HF_COMMAND": "no-such-hf", "APPLIANCE_PREFIX": str(tmp_path / "x")}
    missing = subprocess.run([str(ROOT / "scripts" / "fetch_models"), "--models-dir", str(tmp_path / "m"),
                              "--config", str(tmp_path / "c.yaml"), "qwen3-0.6b"],
                             env=env, capture_output=True, text=True, timeout=120, check=False)
    assert missing.returncode == 2 and "is not installed" in missing.stderr
    assert not (tmp_path / "m" / "qwen3-0.6b").exists()
    (tmp_path / "appliance.yaml").write_text("models: [unclosed\n")
    broken = fetch_models(tmp_path, hub, "qwen3-0.6b")
    assert broken.returncode == 2 and "not valid YAML" in broken.stderr
    assert calls(hub) == [], "a config that cannot take the entries is refused before any download"


def test_merge_models_touches_only_the_models_block() -> None:
    new = model_entry("qwen2.5-0.5b-instruct", "chat", "/opt/m/q", default=True)
    merged = merge_models(CONFIG_TEXT, [new])
    data = yaml.safe_load(merged)
    assert [m["id"] for m in data["models"]] == ["smollm2-135m-instruct", "qwen2.5-0.5b-instruct"]
    assert "default" not in data["models"][0], "one default per kind: the new one takes over"
    assert data["telemetry"] == {"interval": 5}
    assert merged.splitlines()[:3] == CONFIG_TEXT.splitlines()[:3]
    appended = merge_models("mqtt:\n  port: 1884\n", [model_entry("x", "image", "m/x")])
    image = {"id": "x", "kind": "image", "path": "m/x", "runtime": "auto"}
    assert yaml.safe_load(appended) == {"mqtt": {"port": 1884}, "models": [image]}


def test_bundle_config_lists_every_end_of_turn_id() -> None:
    merged = bundle_config({"eos_token_id": 151645, "hidden_size": 8}, {"eos_token_id": [151645, 151643]})
    assert merged == {"eos_token_id": [151645, 151643], "hidden_size": 8}
    assert bundle_config({"eos_token_id": [2]}, None)["eos_token_id"] == [2]
