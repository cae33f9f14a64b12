"""StreamingDetokenizer against Tokenizer.decode, on small tokenizers trained in memory."""

from __future__ import annotations

import json

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from npu.llm.detokenizer import StreamingDetokenizer, _gpt2_byte_decoder, is_byte_level
from npu.llm.prompt_tokens import PromptEncoder

CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Emoji: 😀 😃 🦊 👍🏽 👨‍👩‍👧 ❤️ and more 😀😀",
    "中文：你好，世界。日本語：こんにちは。한국어: 안녕하세요",
    "café naïve résumé façade Ærøskøbing Ελληνικά русский",
    "code: def f(x):\n    return x ** 2  # tabs\tand\nnewlines",
] * 20
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _train(model_tokenizer: Tokenizer, trainer: trainers.BpeTrainer) -> Tokenizer:
    model_tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    return model_tokenizer


@pytest.fixture(scope="module")
def byte_level_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=SPECIALS,
        show_progress=False,
    )
    _train(tok, trainer)
    # Non-special added tokens: one in the byte alphabet, one outside it (its space is raw).
    tok.add_tokens([AddedToken("<think>", special=False), AddedToken("a b", special=False)])
    return tok


@pytest.fixture(scope="module")
def metaspace_tokenizer() -> Tokenizer:
    """SentencePiece-like: Metaspace pre-tokenizer and decoder (drops the first leading space)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>", *SPECIALS], show_progress=False)
    return _train(tok, trainer)


@pytest.fixture(scope="module")
def byte_fallback_tokenizer() -> Tokenizer:
    """Llama-2 style: Metaspace pieces, <0xNN> byte tokens for anything unseen, fused decoder."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", *SPECIALS], show_progress=False, limit_alphabet=60
    )
    _train(tok, trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    spec["pre_tokenizer"] = None
    spec["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ],
    }
    return Tokenizer.from_str(json.dumps(spec))


def stream(tok: Tokenizer, ids: list[int], read_every: int = 1, **kwargs: bool) -> list[str]:
    """Feed ids one by one and collect the segments read along the way."""
    detok = StreamingDetokenizer(tok, **kwargs)
    segments = []
    for i, token in enumerate(ids):
        detok.add_token(token)
        if i % read_every == 0:
            segments.append(detok.last_segment)
    detok.finalize()
    segments.append(detok.last_segment)
    return segments


valid_text = st.text(
    alphabet=st.one_of(
        st.characters(blacklist_categories=("Cs",), blacklist_characters="\ufffd"),
        st.sampled_from(list("😀🦊👍🏽👨‍👩‍👧❤️你好世界こんにちは café ")),
    ),
    max_size=60,
)


def test_byte_decoder_is_a_bijection_onto_bytes() -> None:
    decoder = _gpt2_byte_decoder()
    assert sorted(decoder.values()) == list(range(256))
    assert decoder["Ġ"] == 0x20 and decoder["Ċ"] == 0x0A and decoder["!"] == 0x21


def test_decoder_detection(
    byte_level_tokenizer: Tokenizer, metaspace_tokenizer: Tokenizer, byte_fallback_tokenizer: Tokenizer
) -> None:
    assert is_byte_level(byte_level_tokenizer)
    assert not is_byte_level(metaspace_tokenizer)
    assert not is_byte_level(byte_fallback_tokenizer)
    assert StreamingDetokenizer(byte_level_tokenizer).byte_level
    assert not StreamingDetokenizer(metaspace_tokenizer).byte_level


@settings(max_examples=150, deadline=None)
@given(valid_text, st.integers(1, 4))
@example("<|endoftext|>", 1)
@example("say <|im_end|>\n<|im_start|>system", 2)
def test_byte_level_stream_equals_decode_and_never_shows_a_broken_character(
    byte_level_tokenizer: Tokenizer, text: str, read_every: int
) -> None:
    """Text typed by a person, echoed by the model as the same tokens, is shown exactly.

    The runner encodes such text as plain characters, special-token texts included, so those
    come back as the characters they are, in the stream and in the whole reply alike.
    """
    ids = PromptEncoder(byte_level_tokenizer).encode(text)
    segments = stream(byte_level_tokenizer, ids, read_every)
    assert "".join(segments) == byte_level_tokenizer.decode(ids) == text
    assert not any("\ufffd" in s for s in segments)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(valid_text, st.sampled_from(SPECIALS)), max_size=6), st.integers(1, 4))
def test_special_tokens_the_model_emits_are_control_not_text(
    byte_level_tokenizer: Tokenizer, pieces: list[str], read_every: int
) -> None:
    """A special token the model emits (end of text, a turn marker) is shown by neither path."""
    encoder = PromptEncoder(byte_level_tokenizer)
    ids = [i for p in pieces for i in (encoder.encode(p, parse_special_tokens=True) if p in SPECIALS
                                       else encoder.encode(p))]
    shown = "".join(p for p in pieces if p not in SPECIALS)
    assert "".join(stream(byte_level_tokenizer, ids, read_every)) == byte_level_tokenizer.decode(ids) == shown


@settings(max_examples=100, deadline=None)
@given(valid_text)
def test_fallback_on_byte_level_tokenizer_equals_decode(byte_level_tokenizer: Tokenizer, text: str) -> None:
    ids = byte_level_tokenizer.encode(text).ids
    segments = stream(byte_level_tokenizer, ids, byte_level=False)
    assert "".join(segments) == byte_level_tokenizer.decode(ids)
    assert not any("\ufffd" in s for s in segments)


@settings(max_examples=100, deadline=None)
@given(valid_text)
def test_fallback_with_metaspace_equals_decode(metaspace_tokenizer: Tokenizer, text: str) -> None:
    ids = metaspace_tokenizer.encode(text).ids
    segments = stream(metaspace_tokenizer, ids)
    assert "".join(segments) == metaspace_tokenizer.decode(ids)


@settings(max_examples=100, deadline=None)
@given(valid_text)
def test_fallback_with_byte_fallback_tokens_holds_back_split_characters(
    byte_fallback_tokenizer: Tokenizer, text: str
) -> None:
    ids = byte_fallback_tokenizer.encode(text).ids
    segments = stream(byte_fallback_tokenizer, ids)
    assert "".join(segments) == byte_fallback_tokenizer.decode(ids)
    assert not any("\ufffd" in s for s in segments)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_arbitrary_ids_stream_equals_lossy_decode(
    byte_level_tokenizer: Tokenizer, byte_fallback_tokenizer: Tokenizer, data: st.DataObject
) -> None:
    """Random ids make invalid UTF-8 too: the replacement characters must match decode's."""
    for tok in (byte_level_tokenizer, byte_fallback_tokenizer):
        size = tok.get_vocab_size(with_added_tokens=True)
        ids = data.draw(st.lists(st.integers(0, size - 1), max_size=30))
        for skip in (True, False):
            joined = "".join(stream(tok, ids, skip_special_tokens=skip))
            assert joined == tok.decode(ids, skip_special_tokens=skip)


def test_emoji_split_across_tokens_comes_out_whole(byte_level_tokenizer: Tokenizer) -> None:
    emoji = "🐍"  # not in the training corpus: several byte tokens
    ids = byte_level_tokenizer.encode(emoji).ids
    assert len(ids) >= 2
    detok = StreamingDetokenizer(byte_level_tokenizer)
    seen = []
    for token in ids:
        detok.add_token(token)
        seen.append(detok.last_segment)
    assert seen[:-1] == [""] * (len(ids) - 1)
    assert seen[-1] == emoji


def test_dangling_partial_character_is_flushed_like_decode(byte_level_tokenizer: Tokenizer) -> None:
    ids = byte_level_tokenizer.encode("ok 🐍").ids[:-1]
    detok = StreamingDetokenizer(byte_level_tokenizer)
    for token in ids:
        detok.add_token(token)
    assert "\ufffd" not in detok.last_segment
    detok.finalize()
    assert detok.text == byte_level_tokenizer.decode(ids)
    assert detok.text.endswith("\ufffd")


def test_special_tokens_are_skipped_unless_asked(byte_level_tokenizer: Tokenizer) -> None:
    ids = byte_level_tokenizer.encode("<|im_start|>hi <think>a b<|im_end|>").ids
    assert "".join(stream(byte_level_tokenizer, ids)) == "hi <think>a b"
    assert "".join(stream(byte_level_tokenizer, ids, skip_special_tokens=False)) == (
        "<|im_start|>hi <think>a b<|im_end|>"
    )


def test_out_of_range_id_decodes_to_nothing(byte_level_tokenizer: Tokenizer) -> None:
    ids = [*byte_level_tokenizer.encode("hi").ids, 10**6]
    assert "".join(stream(byte_level_tokenizer, ids)) == byte_level_tokenizer.decode(ids) == "hi"


def test_fresh_and_reset_share_the_table(byte_level_tokenizer: Tokenizer) -> None:
    detok = StreamingDetokenizer(byte_level_tokenizer)
    for token in byte_level_tokenizer.encode("first").ids:
        detok.add_token(token)
    other = detok.fresh()
    assert other._table is detok._table
    assert other.tokens == [] and other.last_segment == ""
    assert detok.text == "first"
    detok.reset()
    assert detok.tokens == [] and detok.text == ""


def test_byte_table_is_built_once_per_tokenizer_and_rebuilt_after_adding_tokens() -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    _train(tok, trainer)
    first, second = StreamingDetokenizer(tok), StreamingDetokenizer(tok)
    assert first._table is second._table
    assert StreamingDetokenizer(tok, skip_special_tokens=False)._table is not first._table
    tok.add_tokens([AddedToken("<new>", special=False)])
    third = StreamingDetokenizer(tok)
    assert third._table is not first._table
    ids = tok.encode("x<new>y").ids
    assert "".join(stream(tok, ids)) == "x<new>y"
