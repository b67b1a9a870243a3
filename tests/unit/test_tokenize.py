"""The bounded tokenizer: open_clip's tokens for ordinary texts, bounded work for hostile ones."""

from __future__ import annotations

import pickle
import random
import string
import threading
import time
from typing import Any

import open_clip
import pytest
import torch

from common.preprocess import tokenizer
from common.tokenize import (
    BPE_CACHE_ENTRIES,
    CHARS_PER_TOKEN,
    MAX_WORD_SYMBOLS,
    BoundedTokenizer,
    bounded,
)

CAPTIONS = [
    "a red circle",
    "A photo of a dog playing fetch in the park.",
    "Two people riding bicycles down a busy street at night, with neon signs!",
    "close-up of a blue square on a white background (studio shot)",
    "the cat's toy, the dog's bone & a bird's nest",
    "123 apples and 4.5 oranges at $3.99 each",
    "https://example.com/images/cat_photo_2021.jpg",
    "Café au lait, crème brûlée et pâtisserie française",
    "Ein Donaudampfschifffahrtsgesellschaftskapitän auf der Brücke",
    "pneumonoultramicroscopicsilicovolcanoconiosis explained",
    "日本の桜の木と富士山の写真",  # a CJK run is one word of 39 bytes
    "一只在草地上奔跑的金毛寻回犬和一个红色的飞盘在阳光下闪闪发光",  # 31 chars, 93 bytes
    "Кошка сидит на подоконнике",
    "sunset 🌅🌅🌅 at the beach 😂😂😂😂😂😂😂😂",
    "#thinkbigsundaywithmarsha #blackandwhitephotography",
    "Tom &amp; Jerry &lt;3 &quot;classic&quot;",
    "   lots   of\tspaces\nand   newlines   ",
    "",
    "<start_of_text> a literal special token <end_of_text>",
    "An aerial view of a small coastal town with white houses, narrow streets winding up the hill, "
    "fishing boats in the harbour, a lighthouse on the rocks and the sea stretching to the horizon "
    "under a clear summer sky; photographed from a drone in the early morning light.",
]


@pytest.fixture(scope="module", params=["ViT-B-32", "duet-micro"])
def pair(request: pytest.FixtureRequest) -> tuple[BoundedTokenizer, open_clip.SimpleTokenizer]:
    """(ours, open_clip's own) for a context of 77 and one of 20."""
    return tokenizer(request.param), open_clip.get_tokenizer(request.param)


def test_ordinary_captions_get_exactly_open_clips_tokens(pair):
    ours, reference = pair
    torch.testing.assert_close(ours(CAPTIONS), reference(CAPTIONS), atol=0, rtol=0)
    assert ours.context_length == reference.context_length


def test_texts_right_at_the_cuts_get_exactly_open_clips_tokens(pair):
    ours, reference = pair
    words = " ".join(random.Random(0).choice(CAPTIONS[1:10]) for _ in range(400))
    budget = ours.context_length * CHARS_PER_TOKEN
    texts = [
        words[:budget],  # exactly the character budget
        words[: budget + 1],
        words[: budget - 1],
        words,  # ~20,000 characters, cut to the budget
        "x" * (MAX_WORD_SYMBOLS - 1),  # the longest words encoded whole
        "ab" * (MAX_WORD_SYMBOLS // 2),
        "é" * (MAX_WORD_SYMBOLS // 2),  # 2 bytes each: 128 bytes
        "a photo of " + "photography" * 11,  # 121 letters, few tokens each
    ]
    torch.testing.assert_close(ours(texts), reference(texts), atol=0, rtol=0)
    # the cut comes before cleaning: a word after a budget's worth of spaces is not reached
    torch.testing.assert_close(ours([" " * budget + "dog"]), reference([""]), atol=0, rtol=0)


def test_a_long_word_is_encoded_in_pieces_as_open_clip_encodes_each_piece():
    ours, reference = tokenizer("ViT-B-32"), open_clip.get_tokenizer("ViT-B-32")
    rng = random.Random(1)
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(3 * MAX_WORD_SYMBOLS + 5))
    pieces = " ".join(word[i : i + MAX_WORD_SYMBOLS] for i in range(0, len(word), 128))
    torch.testing.assert_close(ours([word]), reference([pieces]), atol=0, rtol=0)
    assert not torch.equal(ours([word]), reference([word]))  # 389 letters: over the limit


def hostile_texts(n: int) -> list[str]:
    """Texts that cost open_clip the most: one long word of random letters, emoji, CJK."""
    rng = random.Random(2)
    letters = ["".join(rng.choice(string.ascii_lowercase) for _ in range(1000)) for _ in range(n)]
    return letters + ["😀🙃" * 600, "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(900))]


def test_hostile_texts_byte_pair_encode_a_few_pieces_of_bounded_length():
    ours = tokenizer("ViT-B-32")
    ours(hostile_texts(8))
    # each text is encoded only until its context is full: one or two pieces of 128 bytes each
    # (open_clip byte-pair encodes each 1,000-letter word whole: ~0.1-0.3 s apiece)
    assert 0 < ours.cache_entries() <= 3 * 10
    huge = " ".join(letters(i) for i in range(100_000))  # 0.7 MB of distinct words
    before = ours.cache_entries()
    ours([huge])
    assert ours.cache_entries() - before <= ours.context_length  # not 100,000 words


def test_hostile_texts_take_milliseconds_not_seconds():
    """Wall time, with a margin for a loaded machine: ~0.3 s here, open_clip ~6 s."""
    ours = tokenizer("ViT-B-32")
    texts = hostile_texts(32)
    start = time.perf_counter()
    tokens = ours(texts)
    assert time.perf_counter() - start < 2.5
    assert tokens.shape == (34, 77)


def letters(n: int) -> str:
    """A distinct word of letters for each n (digits would be words of their own)."""
    return "zq" + "".join(string.ascii_lowercase[n // 26**i % 26] for i in range(4))


def test_the_word_cache_is_bounded_and_open_clips_own_cache_stays_empty():
    ours = tokenizer("duet-micro")
    inner: Any = ours.inner
    special = len(inner.cache)
    words = [letters(i) for i in range(BPE_CACHE_ENTRIES + 2000)]  # each a distinct word
    for start in range(0, len(words), 5):  # 5 words of ~3 tokens fit a context of 20
        ours([" ".join(words[start : start + 5])])
    assert ours.cache_entries() == BPE_CACHE_ENTRIES
    assert len(inner.cache) == special  # open_clip's unbounded dict holds only the special tokens
    reference = open_clip.get_tokenizer("duet-micro")
    torch.testing.assert_close(ours(CAPTIONS), reference(CAPTIONS), atol=0, rtol=0)


def test_tokenizing_from_many_threads_gives_the_same_tokens():
    ours, reference = tokenizer("ViT-B-32"), open_clip.get_tokenizer("ViT-B-32")
    expected = reference(CAPTIONS)
    results: list[torch.Tensor] = []

    def work() -> None:
        for _ in range(5):
            results.append(ours(CAPTIONS))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == 20
    for tokens in results:
        torch.testing.assert_close(tokens, expected, atol=0, rtol=0)


def test_a_pickled_tokenizer_tokenizes_the_same():
    """A DataLoader started by spawn pickles the tokenizer into its workers."""
    ours = tokenizer("duet-micro")
    ours(CAPTIONS)
    copy = pickle.loads(pickle.dumps(ours))
    torch.testing.assert_close(copy(CAPTIONS), ours(CAPTIONS), atol=0, rtol=0)
    inner: Any = copy.inner
    assert "<start_of_text>" in inner.cache  # the special tokens survive the copy


def test_wrapping_twice_wraps_once():
    ours = tokenizer("duet-micro")
    assert bounded(ours) is ours


def test_hugging_face_tokenizers_get_the_character_cut(tmp_path):
    """open_clip's HFTokenizer over a fast (Rust) tokenizer: only the characters within the
    budget reach it (seen here through a word placed after a run of spaces)."""
    from open_clip.tokenizer import HFTokenizer
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "red": 2, "circle": 3}
    model = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=model, pad_token="[PAD]", unk_token="[UNK]")
    fast.save_pretrained(tmp_path)
    reference = HFTokenizer(str(tmp_path), context_length=4, clean="lower")
    ours = bounded(HFTokenizer(str(tmp_path), context_length=4, clean="lower"))
    budget = 4 * CHARS_PER_TOKEN
    texts = ["red circle", "red " * 100_000, " " * budget + "circle", " " * (budget - 7) + "circle"]
    tokens = ours(texts)
    assert tokens.tolist() == [[2, 3, 0, 0], [2, 2, 2, 2], [0, 0, 0, 0], [3, 0, 0, 0]]
    assert reference(texts[2:3]).tolist() == [[3, 0, 0, 0]]  # uncut, the word is found
    assert ours.context_length == 4 and ours.cache_entries() == 0
