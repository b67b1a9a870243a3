"""The real clients of OpenAI's embeddings API against the running service's /v1 routes: OpenAI's
own `openai` package, LangChain's OpenAIEmbeddings and LlamaIndex's OpenAIEmbedding (the rows of
docs/api.md's clients table); the reasons of errors reach their exceptions."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest
from langchain_openai import OpenAIEmbeddings
from llama_index.embeddings.openai import OpenAIEmbedding
from pydantic import SecretStr

from tests.conftest import running_service
from tests.serve_support import make_artifact, make_index, make_shard, png

pytestmark = pytest.mark.slow

KEY = "sk-test-key"
TEXTS = ["a red circle", "a small blue square in the corner", "a green star"]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("openai")
    artifact = make_artifact(root)
    index = make_index(artifact, make_shard(root / "data", samples=16), root / "index")
    settings = {"DUET_API_KEY": KEY, "DUET_MAX_ITEMS_PER_REQUEST": "8"}
    with running_service(artifact, index, env=settings) as url:
        yield url


def embed_texts(base: str, texts: list[str]) -> np.ndarray:
    """The vectors /embed gives: the reference every client's must equal."""
    headers = {"Authorization": f"Bearer {KEY}"}
    response = httpx.post(f"{base}/embed", json={"texts": texts}, headers=headers)
    return np.array(response.json()["text_embeddings"])


def test_texts_and_images_embed_as_with_embed(base: str):
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)
    (model,) = client.models.list().data
    assert model.id == "duet-micro" and model.owned_by == "duet"
    texts = ["a red circle", "a small blue square in the corner"]
    answer = client.embeddings.create(model=model.id, input=texts)  # the client asks for base64
    plain = client.embeddings.create(model=model.id, input=texts, encoding_format="float")
    headers = {"Authorization": f"Bearer {KEY}"}
    reference = httpx.post(f"{base}/embed", json={"texts": texts}, headers=headers).json()
    for got in (answer, plain):
        vectors = np.array([item.embedding for item in got.data])
        assert vectors.shape == (2, 64) and [item.index for item in got.data] == [0, 1]
        np.testing.assert_allclose(vectors, reference["text_embeddings"], atol=1e-6)
    assert answer.usage.prompt_tokens == answer.usage.total_tokens > 2 * 2
    # an image input is the picture's embedding (as /embed gives it), not its text's
    image = "data:image/png;base64," + base64.b64encode(png(40)).decode()
    pictures = client.embeddings.create(
        model=model.id, input=[image], extra_body={"modality": "image"}
    )
    both = httpx.post(f"{base}/embed", json={"texts": [image], "images": [image]}, headers=headers)
    picture = np.array(pictures.data[0].embedding)
    np.testing.assert_allclose(picture, both.json()["image_embeddings"][0], atol=1e-6)
    assert float(picture @ np.array(both.json()["text_embeddings"][0])) < 0.99


def test_errors_reach_the_client_as_openais_exceptions(base: str):
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)
    calls = [
        (openai.NotFoundError, "'text-embedding-3-small' is not served here", "model",
         {"model": "text-embedding-3-small"}),
        (openai.UnprocessableEntityError, "max_items_per_request", "input", {"input": ["x"] * 9}),
        (openai.UnprocessableEntityError, "have 64 dimensions", "dimensions", {"dimensions": 32}),
    ]  # fmt: skip
    for error, message, param, change in calls:
        arguments = {"model": "duet-micro", "input": "a red circle", **change}
        with pytest.raises(error) as raised:
            client.embeddings.create(**arguments)
        assert message in str(raised.value)  # what a user sees: the reason, not only the status
        assert raised.value.param == param
    with pytest.raises(openai.NotFoundError, match="'gpt-4o' is not served here"):
        client.models.retrieve("gpt-4o")
    wrong_key = openai.OpenAI(base_url=f"{base}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="API key"):
        wrong_key.models.list()


def test_models_retrieve(base: str):
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)
    model = client.models.retrieve("duet-micro")
    assert (model.id, model.owned_by) == ("duet-micro", "duet")
    assert model == client.models.list().data[0]


def test_langchain_with_check_embedding_ctx_length_off_gets_the_same_vectors(base: str):
    embeddings = OpenAIEmbeddings(
        model="duet-micro", base_url=f"{base}/v1", api_key=SecretStr(KEY),
        check_embedding_ctx_length=False, max_retries=0,
    )  # fmt: skip
    documents = embeddings.embed_documents(TEXTS)
    query = embeddings.embed_query(TEXTS[0])
    reference = embed_texts(base, TEXTS)
    np.testing.assert_allclose(np.array(documents), reference, atol=1e-6)
    np.testing.assert_allclose(np.array(query), reference[0], atol=1e-6)


def test_token_ids_as_langchain_sends_them_by_default_get_the_way_out(base: str):
    """LangChain's OpenAIEmbeddings by default (check_embedding_ctx_length=True) tokenizes with
    tiktoken and posts the token ids: `{"input": [[id, ...], ...], "model": ...}`. That path
    cannot run here: tiktoken downloads its encoding files (cl100k_base) from a host this machine
    cannot reach, and no package ships them. So the same body goes through the `openai` client,
    as LangChain's code hands it over (`client.create(input=<lists of ids>, ...)`), with ids
    that stand for nothing in particular: what they are cannot matter, they are refused."""
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)
    for token_ids in ([[64, 2579, 12960]], [64, 2579, 12960]):
        with pytest.raises(openai.UnprocessableEntityError) as raised:
            client.embeddings.create(model="duet-micro", input=token_ids)  # type: ignore[arg-type]
        assert "check_embedding_ctx_length=False" in str(raised.value)
        assert raised.value.param == "input"


def test_llama_index_openai_embedding_gets_the_same_vectors(base: str):
    embedding = OpenAIEmbedding(
        model_name="duet-micro", api_base=f"{base}/v1", api_key=KEY, max_retries=0
    )
    documents = embedding.get_text_embedding_batch(TEXTS)
    query = embedding.get_query_embedding(TEXTS[1])
    reference = embed_texts(base, TEXTS)
    np.testing.assert_allclose(np.array(documents), reference, atol=1e-6)
    np.testing.assert_allclose(np.array(query), reference[1], atol=1e-6)
    # without model_name it asks for OpenAI's default model, and is told which one is served
    with pytest.raises(openai.NotFoundError, match="this service serves 'duet-micro'"):
        OpenAIEmbedding(api_base=f"{base}/v1", api_key=KEY, max_retries=0).get_text_embedding("x")
