"""Constrained decoding on the host: llguidance, xgrammar and outlines-core side by side.

For each library and each tokenizer (the demo model's 49,152 tokens and a 151,936-token one,
Qwen2.5's size), prints the one-off tokenizer set-up, the compile time of each JSON schema, and
the cost per decoded token of computing the mask of allowed tokens (median and 95th percentile)
plus applying it to the logits. Decoding is driven by random logits (seeded), so each library
walks its own valid path through the same schemas with the same number of steps at most.

No Qwen tokenizer ships in a package here, so the wide vocabulary is built offline: SmolLM2's
byte-level BPE extended with merges of pairs of its own tokens up to 151,936 entries, which is
what a mask computation sees of a vocabulary (how many tokens, how long, how they share prefixes).

xgrammar and outlines-core are not dependencies of the appliance: ``--install`` pip-installs them
into this venv for the comparison only (xgrammar pulls PyTorch and Triton).

Run: ./scripts/bench_constraints [--steps 64] [--install]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from npu.llm.constraints import apply_bitmask  # noqa: E402

WIDE_VOCAB = 151_936
CANDIDATES = {"xgrammar": "xgrammar==0.2.8", "outlines_core": "outlines-core==0.2.14"}

SCHEMAS: dict[str, dict[str, Any]] = {
    "flat": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer"},
                       "ok": {"type": "boolean"}},
        "required": ["name", "age", "ok"],
    },
    "enum+range": {
        "type": "object",
        "properties": {
            "colour": {"enum": ["red", "green", "blue", "amber"]},
            "speed": {"type": "integer", "minimum": 0, "maximum": 255},
            "level": {"type": "number", "minimum": -1, "maximum": 1},
        },
        "required": ["colour", "speed", "level"],
    },
    "nested+array": {
        "type": "object",
        "properties": {
            "scene": {"type": "string", "maxLength": 32},
            "lights": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
                "type": "object",
                "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 16},
                               "on": {"type": "boolean"}},
                "required": ["id", "on"],
            }},
            "meta": {"type": "object", "properties": {"by": {"type": "string", "maxLength": 12}},
                     "required": ["by"]},
        },
        "required": ["scene", "lights", "meta"],
    },
    "tool-args(8)": {
        "type": "object",
        "properties": {f"p{i}": {"type": ["string", "integer", "boolean"][i % 3]} for i in range(8)},
        "required": [f"p{i}" for i in range(8)],
    },
}


def demo_tokenizer_path() -> Path:
    path = ROOT / "models" / "smollm2-135m-instruct" / "tokenizer.json"
    if not path.is_file():
        sys.exit(f"{path} is missing: run ./scripts/demo or 'appliance models demo' first")
    return path


def widened(tokenizer_json: str, size: int) -> str:
    """A byte-level BPE of ``size`` tokens: the given one plus merges of pairs of its tokens."""
    data = json.loads(tokenizer_json)
    model = data["model"]
    vocab: dict[str, int] = model["vocab"]
    merges: list[Any] = model["merges"]
    added = {t["content"] for t in data["added_tokens"]}
    base = sorted((i, t) for t, i in vocab.items() if t not in added and len(t) > 1)
    pieces = [t for _, t in base[:1200]]
    next_id = max(vocab.values()) + 1
    for a in pieces:
        for b in pieces:
            if next_id >= size:
                break
            joined = a + b
            if joined in vocab:
                continue
            vocab[joined] = next_id
            merges.append([a, b] if isinstance(merges[0], list) else f"{a} {b}")
            next_id += 1
    return json.dumps(data)


def tokenizers_under_test() -> dict[str, Tokenizer]:
    demo = Tokenizer.from_file(str(demo_tokenizer_path()))
    wide = Tokenizer.from_str(widened(demo.to_str(), WIDE_VOCAB))
    return {"demo (49,152)": demo, f"wide ({WIDE_VOCAB:,})": wide}


def token_bytes(tok: Tokenizer) -> list[bytes]:
    """Every id's bytes, as the byte-level decoder defines them (special tokens as their text)."""
    byte_of = {ch: b for b, ch in enumerate(_bytes_to_unicode())}
    out: list[bytes] = [b""] * tok.get_vocab_size()
    for text, i in tok.get_vocab().items():
        try:
            out[i] = bytes(byte_of[c] for c in text)
        except KeyError:
            out[i] = text.encode()
    return out


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte-to-character table, indexed by byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


class Backend:
    """One library: ``setup`` per tokenizer, ``compile`` per schema, then a step loop."""

    name = ""

    def setup(self, tok: Tokenizer, eos: int) -> None: ...
    def compile(self, schema: dict[str, Any]) -> Any: ...
    def start(self, compiled: Any) -> Any: ...
    def fill(self, state: Any, bitmask: np.ndarray) -> None: ...
    def advance(self, state: Any, token: int) -> bool: ...  # False when finished


class LLGuidance(Backend):
    name = "llguidance 1.9.1"

    def setup(self, tok: Tokenizer, eos: int) -> None:
        import llguidance

        self.ll = llguidance
        self.tokenizer = llguidance.LLTokenizer(tok.to_str(), eos_token=eos)

    def compile(self, schema: dict[str, Any]) -> Any:
        grammar = self.ll.LLMatcher.grammar_from_json_schema(schema)
        matcher = self.ll.LLMatcher(self.tokenizer, grammar)
        assert not matcher.is_error(), matcher.get_error()
        return matcher

    def start(self, compiled: Any) -> Any:
        return compiled.deep_copy()

    def fill(self, state: Any, bitmask: np.ndarray) -> None:
        state.unsafe_compute_mask_ptr(bitmask.ctypes.data, bitmask.nbytes)

    def advance(self, state: Any, token: int) -> bool:
        assert state.consume_token(token), state.get_error()
        return not state.is_stopped()


class XGrammar(Backend):
    name = "xgrammar 0.2.8"

    def setup(self, tok: Tokenizer, eos: int) -> None:
        import torch
        import xgrammar
        from transformers import PreTrainedTokenizerFast

        self.xgr, self.torch = xgrammar, torch
        hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=tok.id_to_token(eos))
        info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=tok.get_vocab_size(),
                                                      stop_token_ids=[eos])
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=2, cache_enabled=False)

    def compile(self, schema: dict[str, Any]) -> Any:
        return self.compiler.compile_json_schema(json.dumps(schema))

    def start(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, state: Any, bitmask: np.ndarray) -> None:
        state.fill_next_token_bitmask(self.torch.from_numpy(bitmask.reshape(1, -1)))

    def advance(self, state: Any, token: int) -> bool:
        assert state.accept_token(token)
        return not state.is_terminated()


class OutlinesCore(Backend):
    name = "outlines-core 0.2.14"

    def setup(self, tok: Tokenizer, eos: int) -> None:
        import outlines_core

        self.oc = outlines_core
        mapping: dict[bytes, list[int]] = {}
        for i, b in enumerate(token_bytes(tok)):
            if i != eos and b:
                mapping.setdefault(b, []).append(i)
        self.vocabulary = outlines_core.Vocabulary(eos, mapping)

    def compile(self, schema: dict[str, Any]) -> Any:
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.oc.Index(regex, self.vocabulary)

    def start(self, compiled: Any) -> Any:
        return self.oc.Guide(compiled)

    def fill(self, state: Any, bitmask: np.ndarray) -> None:
        state.write_mask_into(bitmask.ctypes.data, bitmask.size, 4)

    def advance(self, state: Any, token: int) -> bool:
        state.advance(token)
        return not state.is_finished()


def available(install: bool) -> list[Backend]:
    out: list[Backend] = [LLGuidance()]
    for module, package in CANDIDATES.items():
        if importlib.util.find_spec(module) is None and install:
            print(f"installing {package} into {sys.prefix} for this bench only", flush=True)
            subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", package], check=False)
        if importlib.util.find_spec(module) is None:
            print(f"{module}: not installed (pass --install to compare it)")
            continue
        out.append(XGrammar() if module == "xgrammar" else OutlinesCore())
    return out


def timed(call: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    value = call()
    return value, (time.perf_counter() - start) * 1e3


def run(backend: Backend, label: str, tok: Tokenizer, steps: int, seed: int) -> None:
    eos = tok.token_to_id("<|endoftext|>") or 0
    vocab = tok.get_vocab_size()
    _, setup_ms = timed(lambda: backend.setup(tok, eos))
    print(f"\n{backend.name}, {label}: tokenizer set-up {setup_ms:.0f} ms (once per model)")
    print(f"  {'schema':<14} {'compile ms':>10} {'tokens':>6} {'mask us p50':>11} {'p95':>7} "
          f"{'apply us':>8}")
    rng = np.random.default_rng(seed)
    bitmask = np.zeros((vocab + 31) // 32, np.int32)
    for name, schema in SCHEMAS.items():
        compiled, compile_ms = timed(lambda s=schema: backend.compile(s))  # type: ignore[misc]
        state = backend.start(compiled)
        masks: list[float] = []
        applies: list[float] = []
        for _ in range(steps):
            logits = rng.standard_normal(vocab).astype(np.float32)
            t0 = time.perf_counter()
            backend.fill(state, bitmask)
            t1 = time.perf_counter()
            apply_bitmask(logits, bitmask)
            t2 = time.perf_counter()
            masks.append((t1 - t0) * 1e6)
            applies.append((t2 - t1) * 1e6)
            token = int(np.argmax(logits))
            if not np.isfinite(logits[token]) or not backend.advance(state, token):
                break
        p95 = sorted(masks)[max(0, int(len(masks) * 0.95) - 1)]
        print(f"  {name:<14} {compile_ms:>10.1f} {len(masks):>6} {statistics.median(masks):>11.0f} "
              f"{p95:>7.0f} {statistics.median(applies):>8.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=64, help="tokens decoded per schema at most")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--install", action="store_true",
                        help="pip-install xgrammar and outlines-core into this venv to compare them")
    parser.add_argument("--only", choices=["llguidance", "xgrammar", "outlines-core"], default=None)
    args = parser.parse_args()
    backends = available(args.install)
    if args.only:
        backends = [b for b in backends if b.name.startswith(args.only)]
    for label, tok in tokenizers_under_test().items():
        for backend in backends:
            run(backend, label, tok, args.steps, args.seed)


if __name__ == "__main__":
    main()
