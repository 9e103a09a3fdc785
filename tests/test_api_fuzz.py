"""schemathesis against the OpenAPI schema of a running ``sounding serve``: no input the
schema allows (or almost allows) may produce a 5xx."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from .conftest import serve_site

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fuzzed_site(sandbox_proc: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    # a site of its own: the fuzzer, holding the operator key, may opt out anything
    with serve_site(sandbox_proc, tmp_path_factory.mktemp("fuzz")) as info:
        yield info


@pytest.fixture(scope="module")
def api_schema(fuzzed_site: dict[str, str]) -> Any:
    return schemathesis.openapi.from_url(fuzzed_site["base"] + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: Any, fuzzed_site: dict[str, str]) -> None:
    case.call_and_validate(headers={"X-API-Key": fuzzed_site["operator"]}, checks=[not_a_server_error],
                           timeout=60)


@schema.parametrize()
@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors_without_a_key(case: Any) -> None:
    case.call_and_validate(checks=[not_a_server_error], timeout=60)
