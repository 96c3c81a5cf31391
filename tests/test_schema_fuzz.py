"""schemathesis walks the app's own OpenAPI schema against a live server: no request may get a 5xx."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from tests.conftest import loupe_settings
from tests.servers import serve


@pytest.fixture(scope="module")
def fuzz_url(weights_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from server.app import create_app

    # A tiny output cap keeps generated requests that pass validation quick on the CPU.
    app_settings = loupe_settings(weights_dir, tmp_path_factory.mktemp("fuzz"), max_output_side=64)
    with serve(create_app(app_settings)) as url:
        yield url


def test_no_operation_answers_with_a_server_error(fuzz_url: str) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzz_url}/openapi.json")
    # The progress stream stays open while it waits for its request to appear: not a request/response operation.
    operations = [op for op in (result.ok() for result in schema.get_all_operations())
                  if not op.path.startswith("/v1/progress/")]
    assert any(op.path == "/v1/images/edits" for op in operations)
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=100, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def no_server_error(case: schemathesis.Case) -> None:
            response = case.call(timeout=60)
            case.validate_response(response, checks=[not_a_server_error])

        no_server_error()
