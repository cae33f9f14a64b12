"""The demo bundle is converted again when it came from an older converter, not only another GGUF."""

from __future__ import annotations

import json
from pathlib import Path

from appliance.demo_model import bundle_matches
from npu.convert.bundle_writer import BUNDLE_FORMAT


def write(bundle: Path, **config: object) -> Path:
    bundle.mkdir(parents=True, exist_ok=True)
    (bundle / "config.json").write_text(json.dumps({"source": {"sha256": "abc"}, "weight_bits": None,
                                                    **config}))
    return bundle


def test_a_bundle_matches_only_its_gguf_its_weights_and_this_converters_format(tmp_path: Path) -> None:
    current = write(tmp_path / "current", bundle_format=BUNDLE_FORMAT)
    assert bundle_matches(current, "abc", None)
    assert not bundle_matches(current, "other", None)
    assert not bundle_matches(current, "abc", 4)
    assert not bundle_matches(write(tmp_path / "old"), "abc", None), "an older converter's bundle is rebuilt"
    assert not bundle_matches(tmp_path / "missing", "abc", None)
