"""The LLM runner: a bundle loaded on one device, generating step by step.

Generation comes in layers of generators (after mlx-lm): ``generate_step`` yields one ``Step`` per
unit of device work (a prefill chunk, or a decode token) and knows nothing of text;
``stream_generate`` turns tokens into safe text deltas, applies stop strings, EOS and max_tokens,
and counts usage and timings. One ``next()`` is one bounded piece of work, which is what lets the
engine interleave several jobs on one NPU and check cancellation between steps.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from npu.llm.chat_template import ChatTemplate
from npu.llm.constraints import GrammarCache
from npu.llm.detokenizer import StreamingDetokenizer
from npu.llm.embedding import EmbeddingTable
from npu.llm.kv_cache import CachePool, SequenceCache, reusable_prefix
from npu.llm.layer_stack import LayerStack
from npu.llm.logits_processors import TokenHistory, make_logits_processors
from npu.llm.logprobs import token_logprob
from npu.llm.model_args import ModelArgs
from npu.llm.params import GenerationParams, GenerationResponse, ParamError, TokenLogprob, Usage
from npu.llm.prompt_tokens import PromptEncoder
from npu.llm.sampling import make_sampler
from npu.llm.stops import StopMatcher
from npu.llm.tools import RepeatGuard

logger = logging.getLogger(__name__)


class ContextLengthError(ValueError):
    """The prompt does not fit the model's context; names both lengths."""

    def __init__(self, prompt_tokens: int, limit: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.limit = limit
        super().__init__(
            f"the prompt has {prompt_tokens} tokens, more than the {limit} prompt tokens this "
            f"model's context holds; shorten the prompt or the conversation history"
        )


@dataclass
class KeptPrefix:
    """A prompt prefix prefilled once and kept: ``tokens`` (whole prefill chunks) and a copy of
    their K/V rows in the stack's own form (host arrays, or buffers on the card)."""

    tokens: list[int]
    rows: Any


@dataclass(frozen=True)
class Step:
    """One unit of device work: a prefill chunk (``token is None``) or a sampled token.

    Under a constraint, ``complete`` says whether the answer so far is a whole one and
    ``finished`` that nothing but the end can follow.
    """

    token: int | None
    prompt_done: int
    logprob: TokenLogprob | None = None
    complete: bool | None = None
    finished: bool = False


class LLMRunner:
    """A resident LLM: tokenizer, chat template, layer sessions and a pool of KV caches."""

    def __init__(
        self,
        bundle_dir: Path,
        args: ModelArgs,
        stack: LayerStack,
        embedding: EmbeddingTable,
        tokenizer: Tokenizer,
        template: ChatTemplate,
        backend: str,
        cache_slots: int = 1,
        add_bos_token: bool = False,
    ) -> None:
        self.bundle_dir = bundle_dir
        self.args = args
        self.stack = stack
        self.embedding = embedding
        self.tokenizer = tokenizer
        self.prompts = PromptEncoder(tokenizer)
        self.template = template
        self.backend = backend
        self.pool = CachePool(cache_slots, stack.new_cache)
        self.kept: list[KeptPrefix] = []  # shared prefixes (a persona's system prompt), see keep_prefix
        self.eos_ids = frozenset(args.eos_token_id)
        self.grammars = GrammarCache(tokenizer, self.eos_ids)
        self._add_bos = add_bos_token and args.bos_token_id is not None

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        backend: str = "auto",
        device_id: int = 0,
        *,
        threads: int | None = None,
        cache_slots: int = 1,
    ) -> LLMRunner:
        bundle_dir = Path(model_dir)
        if not (bundle_dir / "config.json").is_file():
            raise FileNotFoundError(
                f"{bundle_dir} is not a model bundle (no config.json); "
                "create the demo one with 'appliance models demo'"
            )
        args = ModelArgs.load(bundle_dir)
        if args.converted_before_current_format:
            logger.warning(
                "%s was converted in an older bundle format (%s); it runs, but converting it again "
                "gives the faster graphs ('appliance models demo' or 'appliance models convert')",
                bundle_dir, args.bundle_format or 1,
            )
        started = time.perf_counter()
        stack = LayerStack.load(bundle_dir, args, backend, device_id=device_id, threads=threads)
        concrete = stack.backend
        embedding = EmbeddingTable(bundle_dir, args.vocab_size, args.hidden_size)
        tokenizer = Tokenizer.from_file(str(bundle_dir / "tokenizer.json"))
        template = ChatTemplate.from_bundle(bundle_dir)
        tokenizer_config = bundle_dir / "tokenizer_config.json"
        add_bos = tokenizer_config.is_file() and bool(
            json.loads(tokenizer_config.read_text(encoding="utf-8")).get("add_bos_token", False)
        )
        logger.info(
            "loaded %s on %s (device %d) in %.1f s: %d layers, %s",
            bundle_dir.name, concrete, device_id, time.perf_counter() - started,
            args.num_hidden_layers, stack.plan.describe(),
        )
        return cls(bundle_dir, args, stack, embedding, tokenizer, template, concrete, cache_slots, add_bos)

    def close(self) -> None:
        """Unload the model's sessions from the device; the runner is unusable afterwards."""
        self.stack.close()

    @property
    def context_length(self) -> int:
        return self.stack.kv_cache_len

    def warm_up(self) -> None:
        """One prompt chunk and one decode step, run once after a load.

        A runtime's first run of each graph (and shape) is slow; without this, the first request
        after a start or a recovery pays for it, and its step may look hung to the watchdog.
        """
        for _ in self.stream_generate(self.encode("Hello"), GenerationParams(max_tokens=2, temperature=0.0)):
            pass
        self.grammars.tokenizer  # noqa: B018 -- structured output's token table, built once here

    @property
    def max_prompt_tokens(self) -> int:
        return self.stack.max_prompt_tokens

    def keep_prefix(self, messages: Sequence[dict[str, Any]]) -> int:
        """Prefill these messages (a persona's system prompt) once and keep their rows.

        Every later prompt that starts with them gets the rows copied into its cache instead of
        prefilling them, whichever cache it draws, so the first answer after a load (a start, a
        reload, a card recovery) starts as fast as a warm turn. Only whole prefill chunks are
        kept, as for any reused prefix. Returns the rows kept (0: shorter than one chunk).
        """
        ids = self._with_bos(
            self.prompts.encode_chat(self.template, messages, add_generation_prompt=False)
        )
        chunk = self.stack.chunk
        n = min(len(ids), self.max_prompt_tokens) // chunk * chunk
        if n == 0 or any(k.tokens == ids[:n] for k in self.kept):
            return n
        cache = self.pool.acquire(ids)
        try:
            cache.trim(0)
            while cache.offset < n:
                part = ids[cache.offset : cache.offset + chunk]
                self.stack.prefill_chunk(cache, part, self.embedding.lookup(part))
            self.kept.append(KeptPrefix(ids[:n], self.stack.save_rows(cache, n)))
        finally:
            self.pool.release(cache)
        return n

    def _reuse_kept(self, cache: SequenceCache, prompt_ids: Sequence[int]) -> None:
        """Give the cache a kept prefix's rows when that reuses more of the prompt than it holds."""
        chunk = self.stack.chunk
        have = reusable_prefix(cache.tokens, prompt_ids, chunk)
        best, rows = None, have
        for kept in self.kept:
            usable = reusable_prefix(kept.tokens, prompt_ids, chunk)
            if usable > rows:
                best, rows = kept, usable
        if best is None:
            return
        cache.trim(0)
        self.stack.load_rows(cache, best.rows, rows)
        cache.commit(0, best.tokens[:rows])

    def encode(self, text: str, *, parse_special_tokens: bool = False) -> list[int]:
        """A raw prompt's ids; its special-token texts are the tokens only with ``parse_special_tokens``."""
        return self._with_bos(self.prompts.encode(text, parse_special_tokens=parse_special_tokens))

    def encode_chat(
        self, messages: Sequence[dict[str, Any]], *, enable_thinking: bool = False,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> list[int]:
        """The conversation (and its tools) through the chat template; no message can add a special token."""
        extra: dict[str, Any] = {} if tools is None else {"tools": list(tools)}
        return self._with_bos(
            self.prompts.encode_chat(self.template, messages, enable_thinking=enable_thinking, **extra)
        )

    def _with_bos(self, ids: list[int]) -> list[int]:
        if self._add_bos and (not ids or ids[0] != self.args.bos_token_id):
            ids.insert(0, int(self.args.bos_token_id))  # type: ignore[arg-type]
        return ids

    def check_params(self, params: GenerationParams) -> None:
        """What only the model can tell: every ``logit_bias`` key is one of its token ids."""
        bad = [t for t, _ in params.logit_bias if t >= self.args.vocab_size]
        if bad:
            raise ParamError([f"logit_bias: {bad[0]} is not a token id of this model (ids run from 0 "
                              f"to {self.args.vocab_size - 1})"], [f"logit_bias.{bad[0]}"])

    def describe_token(self, token: int) -> tuple[str, bytes]:
        """A token's text and exact bytes, as logprobs show them."""
        raw = self.grammars.token_bytes(token)
        return raw.decode("utf-8", errors="replace"), raw

    def check_prompt(self, prompt_ids: Sequence[int]) -> None:
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) > self.max_prompt_tokens:
            raise ContextLengthError(len(prompt_ids), self.max_prompt_tokens)

    def generate_step(
        self,
        prompt_ids: Sequence[int],
        params: GenerationParams,
        cache: SequenceCache,
    ) -> Generator[Step, None, None]:
        """Prefill (reusing the cache's common prefix), then sample and decode until closed.

        Ends by itself only when the KV cache is full. The caller stops it (EOS, stop string,
        max_tokens, cancellation) by closing it; the cache then holds exactly the tokens fed.
        """
        self.check_prompt(prompt_ids)
        stack, chunk = self.stack, self.stack.chunk
        prompt = [int(t) for t in prompt_ids]
        cache.trim(reusable_prefix(cache.tokens, prompt, chunk))
        sampler = make_sampler(params)
        processors = make_logits_processors(params, inplace=True)
        mask = self.grammars.mask(params.constraint) if params.constraint is not None else None
        history = TokenHistory(prompt)
        hidden: np.ndarray | None = None
        while cache.offset < len(prompt):
            start = cache.offset
            ids = prompt[start : start + chunk]
            hidden = stack.prefill_chunk(cache, ids, self.embedding.lookup(ids))
            if cache.offset < len(prompt):
                yield Step(None, cache.offset)
        assert hidden is not None
        while True:
            logits = stack.logits(hidden)
            for process in processors:
                logits = process(history, logits)
            if mask is not None:
                logits = mask.apply(logits)
            token = sampler(logits)
            logprob = None
            if params.logprobs is not None and token not in self.eos_ids:
                logprob = token_logprob(logits, token, params.logprobs, self.describe_token)
            history.append(token)
            if mask is None:
                yield Step(token, len(prompt), logprob)
            elif token in self.eos_ids:  # the mask allows the end only once the answer is whole
                yield Step(token, len(prompt), complete=True, finished=True)
            else:
                mask.advance(token)
                yield Step(token, len(prompt), logprob, mask.accepting, mask.finished)
            if cache.free == 0:
                return
            hidden = stack.decode(cache, token, self.embedding.lookup([token]))

    def stream_generate(
        self, prompt_ids: Sequence[int], params: GenerationParams
    ) -> Iterator[GenerationResponse]:
        """Text deltas of one generation; the last item carries ``finish_reason`` and usage.

        Items with ``token is None`` and empty text report progress through a long prompt.
        """
        self.check_prompt(prompt_ids)
        cache = self.pool.acquire(prompt_ids)
        try:
            if self.kept:
                self._reuse_kept(cache, prompt_ids)
            yield from self._stream(prompt_ids, params, cache)
        finally:
            self.pool.release(cache)

    def _stream(
        self, prompt_ids: Sequence[int], params: GenerationParams, cache: SequenceCache
    ) -> Iterator[GenerationResponse]:
        started = time.perf_counter()
        usage = Usage(
            prompt_tokens=len(prompt_ids),
            cached_tokens=reusable_prefix(cache.tokens, prompt_ids, self.stack.chunk),
        )
        detokenizer = StreamingDetokenizer(self.tokenizer)
        stops = StopMatcher(params.stop)
        prompt_ms = 0.0
        first_at = started
        finish = "length"
        carry = ""  # the last token's text when max_tokens or the grammar ends the loop
        constrained = params.constraint is not None
        complete: bool | None = False if constrained else None
        logprobs: list[TokenLogprob] = []  # of tokens whose text is not out yet
        guard = RepeatGuard() if constrained and params.constraint.kind == "tools" else None  # type: ignore[union-attr]
        steps = self.generate_step(prompt_ids, params, cache)
        try:
            for step in steps:
                now = time.perf_counter()
                if step.token is None:
                    yield GenerationResponse(
                        "", None, usage=replace(usage), prompt_ms=(now - started) * 1e3,
                        prompt_done=step.prompt_done,
                    )
                    continue
                if usage.completion_tokens == 0:
                    first_at = now
                    prompt_ms = (now - started) * 1e3
                if constrained:
                    complete = step.complete
                if step.token in self.eos_ids:
                    finish = "stop"
                    break
                usage.completion_tokens += 1
                if step.logprob is not None:
                    logprobs.append(step.logprob)
                detokenizer.add_token(step.token)
                text, stopped = stops.feed(detokenizer.last_segment)
                if stopped:
                    finish = "stop"
                    # A stop string cut the answer: under a constraint it is not a whole one.
                    yield self._final(text, step.token, finish, usage, prompt_ms, first_at,
                                      tuple(logprobs), False if constrained else None)
                    return
                if guard is not None:
                    text, repeated = guard.feed(text)
                    if repeated:  # the calls so far are the answer
                        yield self._final(text, step.token, "stop", usage, prompt_ms, first_at,
                                          tuple(logprobs), True)
                        return
                if step.finished:  # the grammar is complete: end without waiting for EOS
                    finish, carry = "stop", text
                    break
                if usage.completion_tokens >= params.max_tokens:
                    carry = text
                    break
                yield GenerationResponse(
                    text, step.token, usage=replace(usage), prompt_ms=prompt_ms,
                    generation_ms=(now - first_at) * 1e3, logprobs=tuple(logprobs),
                )
                logprobs.clear()
        finally:
            steps.close()
        detokenizer.finalize()
        text, stopped = stops.feed(detokenizer.last_segment)
        if not stopped:
            text += stops.flush()
        else:
            finish = "stop"
            complete = False if constrained else None
        if guard is not None:
            text = guard.feed(text)[0]
            if guard.drop_cut_call():  # a later call cut short: the whole ones are the answer
                complete = True
        yield self._final(carry + text, None, finish, usage, prompt_ms, first_at, tuple(logprobs), complete)

    @staticmethod
    def _final(
        text: str, token: int | None, finish: str, usage: Usage, prompt_ms: float, first_at: float,
        logprobs: tuple[TokenLogprob, ...] = (), complete: bool | None = None,
    ) -> GenerationResponse:
        return GenerationResponse(
            text, token, finish_reason=finish,  # type: ignore[arg-type]
            usage=replace(usage), prompt_ms=prompt_ms,
            generation_ms=(time.perf_counter() - first_at) * 1e3,
            logprobs=logprobs, complete=complete,
        )

    def stream_chat(
        self,
        messages: Sequence[dict[str, Any]],
        params: GenerationParams,
        *,
        enable_thinking: bool = False,
    ) -> Iterator[GenerationResponse]:
        return self.stream_generate(self.encode_chat(messages, enable_thinking=enable_thinking), params)

    def generate(self, prompt_ids: Sequence[int], params: GenerationParams) -> GenerationResponse:
        """The whole completion as one response (text joined, usage and finish of the last item)."""
        parts: list[str] = []
        logprobs: list[TokenLogprob] = []
        last: GenerationResponse | None = None
        for last in self.stream_generate(prompt_ids, params):
            parts.append(last.text)
            logprobs.extend(last.logprobs)
        assert last is not None
        return replace(last, text="".join(parts), logprobs=tuple(logprobs))
