"""schemathesis against the running service's own OpenAPI document: no 5xx, no answer that
contradicts the document, for generated valid and invalid requests to every operation.

Bounded: MAX_EXAMPLES generated cases per operation (plus the document's examples).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.conftest import running_service
from tests.serve_support import make_artifact, make_index, make_shard

pytestmark = pytest.mark.slow

MAX_EXAMPLES = 25


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[schemathesis.BaseSchema]:
    root = tmp_path_factory.mktemp("fuzz")
    artifact = make_artifact(root)
    index = make_index(artifact, make_shard(root / "synth", 8), root / "index")
    env = {"DUET_ACCESS_LOG": "false", "DUET_LOG_LEVEL": "error"}
    with running_service(artifact, index, env=env) as base:
        yield schemathesis.openapi.from_url(f"{base}/openapi.json")


def test_every_operation_conforms_to_the_document(api_schema: schemathesis.BaseSchema) -> None:
    """Each operation in turn (the schemathesis pytest plugin does not run on this pytest)."""
    for result in api_schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def conforms(case: schemathesis.Case) -> None:
            # Not positive_data_acceptance: some rules cannot be said in the document (a valid
            # base64 string need not be an image; k's maximum and the body limits are settings).
            case.call_and_validate(excluded_checks=[positive_data_acceptance])

        try:
            conforms()
        except Exception as exc:
            raise AssertionError(f"{operation.label}: {exc}") from exc
