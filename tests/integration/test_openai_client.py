"""OpenAI's own Python client against the running service's /v1/embeddings and /v1/models."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest

from tests.conftest import running_service
from tests.serve_support import make_artifact, make_index, make_shard, png

pytestmark = pytest.mark.slow

KEY = "sk-test-key"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("openai")
    artifact = make_artifact(root)
    index = make_index(artifact, make_shard(root / "data", samples=16), root / "index")
    settings = {"DUET_API_KEY": KEY, "DUET_MAX_ITEMS_PER_REQUEST": "8"}
    with running_service(artifact, index, env=settings) as url:
        yield url


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
        (openai.NotFoundError, "not served here", {"model": "text-embedding-3-small"}),
        (openai.UnprocessableEntityError, "max_items_per_request", {"input": ["x"] * 9}),
        (openai.UnprocessableEntityError, "dimensions", {"dimensions": 32}),
    ]
    for error, message, change in calls:
        arguments = {"model": "duet-micro", "input": "a red circle", **change}
        with pytest.raises(error) as raised:
            client.embeddings.create(**arguments)
        assert message in str(raised.value.body)  # our envelope's "error", as the client keeps it
    wrong_key = openai.OpenAI(base_url=f"{base}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong_key.models.list()
