"""schemathesis walks the app's own OpenAPI schema against a live server: no request may get a 5xx."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
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


schema = schemathesis.pytest.from_fixture("fuzz_schema")


@pytest.fixture(scope="module")
def fuzz_schema(fuzz_url: str) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{fuzz_url}/openapi.json")


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: schemathesis.Case) -> None:
    response = case.call(timeout=60)
    case.validate_response(response, checks=[not_a_server_error])
