"""schemathesis against the OpenAPI schema of a running ``sounding serve``: no input the
schema allows (or almost allows) may produce a 5xx.

The operations are driven through schemathesis' programmatic API (``as_strategy`` under
hypothesis) rather than its pytest plugin: the plugin reaches into pytest internals that
pytest 9.2 removed, and a fuzz test must not depend on which pytest a fresh machine gets."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from .conftest import serve_site

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fuzzed_site(sandbox_proc: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    # a site of its own: the fuzzer, holding the operator key, may opt out anything
    with serve_site(sandbox_proc, tmp_path_factory.mktemp("fuzz")) as info:
        yield info


def _operations(base: str) -> list[Any]:
    schema = schemathesis.openapi.from_url(base + "/openapi.json")
    ops = [result.ok() for result in schema.get_all_operations()]
    assert len(ops) >= 8, "the API schema lost its operations"
    return ops


def _fuzz(operation: Any, examples: int, headers: dict[str, str]) -> int:
    """Fuzz one operation; the number of requests made."""
    calls = 0

    @given(case=operation.as_strategy())
    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def run(case: Any) -> None:
        nonlocal calls
        calls += 1
        case.call_and_validate(headers=headers, checks=[not_a_server_error], timeout=60)

    run()
    return calls


def test_no_server_errors(fuzzed_site: dict[str, str]) -> None:
    ops = _operations(fuzzed_site["base"])
    calls = sum(_fuzz(op, 30, {"X-API-Key": fuzzed_site["operator"]}) for op in ops)
    assert calls >= 10 * len(ops)


def test_no_server_errors_without_a_key(fuzzed_site: dict[str, str]) -> None:
    ops = _operations(fuzzed_site["base"])
    assert sum(_fuzz(op, 10, {}) for op in ops) >= 3 * len(ops)
