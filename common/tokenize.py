"""Bounded tokenization: what tokenizing one text may cost, whatever the text holds.

open_clip's tokenizers clean and split the whole string before they cut its tokens to the
context, and its CLIP tokenizer (`SimpleTokenizer`) has three costs that grow without bound:

- the text's length: cleaning (ftfy, html.unescape, regexes) is linear in it, and a 1 MB caption
  took 6.5 s. `bounded` cuts each text to `CHARS_PER_TOKEN` characters per context token first
  (1,232 for a context of 77). A CLIP token spans 1-15 characters with its space, so the cut
  never removes text that would have reached the context (runs of whitespace or HTML entities,
  which cleaning shrinks, aside).
- one word's length: byte-pair encoding a word is quadratic in its length (measured: a word of
  1,000 random letters 94-288 ms, of 128 letters 2.5 ms, of 64 letters 0.6 ms). A word — a run
  the tokenizer's pattern takes as one: letters, or punctuation, without spaces — is encoded in
  pieces of at most `MAX_WORD_SYMBOLS` UTF-8 bytes, each piece as open_clip encodes a whole word.
  The longest token of CLIP's vocabulary is 32 bytes (a run of emoji) and the longest dictionary
  words are ~45 letters, so no real word is cut: only runs of more than 128 bytes (128 Latin
  letters, 42 CJK characters, 32 emoji) are tokenized differently from open_clip.
- the words it has seen: its `bpe` cache keeps every distinct word forever (400 requests of
  unique words held +258 MiB). Here the cache is an LRU of `BPE_CACHE_ENTRIES` pieces, each at
  most 128 bytes (measured: 5.5 MiB for 10,000 pieces of 128 random letters).

Words are encoded only until the context is full (the tokens after it are dropped anyway), so a
text's cost is that of its first few pieces: at most 10 ms for the costliest texts tried at a
context of 77 (random letters, emoji, CJK, punctuation runs), against 0.27 s for 1,232 random
letters as one word before. Tokens of every text below these limits
are exactly open_clip's. Hugging Face tokenizers (`HFTokenizer`, `SigLipTokenizer`) get the
character cut only: their Rust models are near-linear in a word's length (CLIP's merges in a
`tokenizers` BPE model: 1,232 random letters 0.6 ms, 10,000 in 4.5 ms) and their word caches
are bounded (800,000 distinct words left its RSS flat).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from open_clip.tokenizer import DEFAULT_CONTEXT_LENGTH, SimpleTokenizer

CHARS_PER_TOKEN = 16
"""Characters of a text kept per token of context (cut before any cleaning)."""
MAX_WORD_SYMBOLS = 128
"""Longest piece of one word byte-pair encoded at once, in UTF-8 bytes (CLIP's BPE symbols)."""
BPE_CACHE_ENTRIES = 10_000
"""Pieces whose byte-pair encoding is remembered (least recently used dropped first)."""


def max_text_chars(context_length: int) -> int:
    """The characters of a text that can reach a context of `context_length` tokens."""
    return context_length * CHARS_PER_TOKEN


def bounded(tokenizer: Callable[..., torch.Tensor]) -> BoundedTokenizer:
    """`tokenizer` (an open_clip tokenizer) with the bounds of this module."""
    return tokenizer if isinstance(tokenizer, BoundedTokenizer) else BoundedTokenizer(tokenizer)


class BoundedTokenizer:
    """texts -> [N, context_length] token ids, as `inner` gives them, at a bounded cost.

    Thread-safe: the service tokenizes on many request threads at once.
    """

    def __init__(self, inner: Callable[..., torch.Tensor]) -> None:
        self.inner = inner
        self.context_length = int(getattr(inner, "context_length", 0) or DEFAULT_CONTEXT_LENGTH)
        self._bpe: _BoundedBpe | None = None
        if isinstance(inner, SimpleTokenizer):
            self._bpe = _BoundedBpe(inner)

    @property
    def max_chars(self) -> int:
        """The characters of a text that are tokenized; the rest is cut before anything runs."""
        return max_text_chars(self.context_length)

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        length = context_length or self.context_length
        cut = [text[: max_text_chars(length)] for text in texts]
        if self._bpe is None:
            tokens: torch.Tensor = self.inner(cut, context_length=length)
            return tokens
        return self._bpe.tokenize(cut, length)

    def cache_entries(self) -> int:
        """Pieces held by the byte-pair-encoding cache (0 for Hugging Face tokenizers)."""
        return 0 if self._bpe is None else self._bpe.cache_entries()


class _BoundedBpe:
    """`SimpleTokenizer.__call__` with word pieces, an LRU cache and an early stop."""

    def __init__(self, inner: SimpleTokenizer) -> None:
        self.inner = inner
        # open_clip's `bpe` keeps every word in `inner.cache`; from now on it keeps only the
        # special tokens (which `bpe` must return as they are), and `_piece` is the cache
        special = [inner.decoder[i] for i in inner.all_special_ids]
        inner.cache = _SpecialTokensOnly({token: token for token in special})
        self._piece = functools.lru_cache(maxsize=BPE_CACHE_ENTRIES)(inner.bpe)

    def __getstate__(self) -> dict[str, Any]:  # a DataLoader started by spawn pickles it
        return {"inner": self.inner}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["inner"])  # type: ignore[misc]

    def cache_entries(self) -> int:
        return self._piece.cache_info().currsize

    def tokenize(self, texts: list[str], context_length: int) -> torch.Tensor:
        inner = self.inner
        sot, eot = inner.sot_token_id, inner.eot_token_id
        if inner.reduction_fn is not None:  # it chooses among all of a text's tokens
            return inner.reduction_fn(
                texts,
                context_length=context_length,
                sot_token_id=sot,
                eot_token_id=eot,
                encode_fn=self.encode,
            )
        result = torch.zeros(len(texts), context_length, dtype=torch.long)
        for i, text in enumerate(texts):
            # as open_clip: cut to the context, the last kept token replaced by end-of-text
            tokens = [sot, *self.encode(text, max_tokens=context_length - 1), eot]
            if len(tokens) > context_length:
                tokens = tokens[:context_length]
                tokens[-1] = eot
            result[i, : len(tokens)] = torch.tensor(tokens)
        return result

    def encode(self, text: str, max_tokens: int | None = None) -> list[int]:
        """`SimpleTokenizer.encode`, a word's pieces at most MAX_WORD_SYMBOLS long; stops once
        it has `max_tokens` ids (those after them would be cut anyway)."""
        inner = self.inner
        ids: list[int] = []
        for word in inner.pat.finditer(inner.clean_fn(text)):
            symbols = "".join(inner.byte_encoder[b] for b in word.group().encode("utf-8"))
            for start in range(0, len(symbols), MAX_WORD_SYMBOLS):
                piece = self._piece(symbols[start : start + MAX_WORD_SYMBOLS])
                ids.extend(inner.encoder[token] for token in piece.split(" "))
                if max_tokens is not None and len(ids) >= max_tokens:
                    return ids
        return ids


class _SpecialTokensOnly(dict[str, str]):
    """A `bpe` cache that holds the special tokens it was made with and stores nothing more."""

    def __setitem__(self, key: str, value: str) -> None:
        pass

    def __reduce__(self) -> Any:  # pickle would refill it through __setitem__
        return (type(self), (dict(self),))


def fill_template(template: str, label: str, max_chars: int) -> str:
    """`template` with each "{}" replaced by `label`, built only as far as `max_chars`.

    The tokenizer reads no further, so the result tokenizes exactly as the whole expansion
    would, and a template of 500 "{}" with a 1,000-character label is 1,232 characters (at a
    context of 77), not 500 KB. `replace`, not `format`: other braces stay text.
    """
    built: list[str] = []
    size = 0
    for i, part in enumerate(template.split("{}")):
        if size >= max_chars:
            break
        if i:
            built.append(label)
            size += len(label)
        built.append(part)
        size += len(part)
    return "".join(built)[:max_chars]
