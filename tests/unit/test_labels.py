"""/classify's prompts and their cache: bounded by the tokenizer's budget, whatever is sent."""

from __future__ import annotations

import gc
import tracemalloc

import numpy as np

from common.preprocess import tokenizer
from common.tokenize import fill_template
from serve.labels import PromptCache, prompts


def test_prompts_are_built_only_as_far_as_the_tokenizer_reads():
    tokenize = tokenizer("ViT-B-32")
    budget = tokenize.max_chars  # 77 tokens x 16 characters
    label = "x" * 1000
    many = "{}" * 500  # 500 KB once expanded
    built = prompts([label, "dog"], [many, "a {} in a {{}} {x}.", "{}"], budget)
    assert built[0] == many.replace("{}", label)[:budget]  # what the tokenizer reads of it
    assert built[1:3] == [("a " + label + " in a {" + label + "} {x}.")[:budget], label]
    assert built[3:] == [("dog" * 500)[:budget], "a dog in a {dog} {x}.", "dog"]
    assert max(len(p) for p in built) == budget
    ordinary = ["a photo of a {}.", "{} and {}", "{}"]
    assert [fill_template(t, "cat", budget) for t in ordinary] == [
        "a photo of a cat.",
        "cat and cat",
        "cat",
    ]


def test_a_cached_prompt_costs_the_same_memory_whatever_its_length():
    """Each entry holds a digest of its prompt, not the prompt: once the request's prompts are
    gone, 500 prompts of 20,000 characters are kept in about the memory of their vectors."""
    cache = PromptCache(entries=1000)
    vectors = np.ones((500, 8), np.float32)
    gc.collect()
    tracemalloc.start()
    try:
        texts = [f"{i} " + "y" * 20_000 for i in range(500)]  # 10 MB of prompts
        cache.put_many("m", texts, vectors)
        probe = [texts[3], "not cached", texts[499]]
        del texts
        gc.collect()
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 500 * 1024  # < 1 KB an entry (the 32-byte vectors are views of one array)
    found = cache.get_many("m", probe)
    assert found[0] is not None and found[1] is None and found[2] is not None
    np.testing.assert_array_equal(found[0], vectors[3])
    assert cache.get_many("other model", probe[:1]) == [None]


def test_the_prompt_cache_drops_the_least_recently_used():
    cache = PromptCache(entries=2)
    cache.put_many("m", ["a", "b"], np.eye(2, dtype=np.float32))
    assert cache.get_many("m", ["a"])[0] is not None  # "a" used: "b" is the oldest now
    cache.put_many("m", ["c"], np.ones((1, 2), np.float32))
    assert [v is not None for v in cache.get_many("m", ["a", "b", "c"])] == [True, False, True]
    assert len(cache) == 2
