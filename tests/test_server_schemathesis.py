"""schemathesis against the server's own OpenAPI document (issue 14): every operation, generated valid and
invalid requests, on a live loopback server with a tiny random model. Checks: no 5xx, invalid requests
rejected, and status codes, content types, headers and bodies as /openapi.json documents them (all of
schemathesis' checks but positive_data_acceptance, see below). Bounded: a few examples per operation."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

from mmguard.server import ServerSettings  # noqa: E402
from mmguard.server.testing import LiveServer  # noqa: E402


@pytest.fixture(scope="module")
def live_server(tiny_guard) -> Iterator[LiveServer]:
    limits = ServerSettings(max_image_bytes=256 * 1024, max_image_pixels=250_000, max_wait_ms=0.0, warmup=False)
    with LiveServer(tiny_guard, limits) as srv:
        yield srv


def _operations(srv: LiveServer) -> list:
    schema = schemathesis.openapi.from_url(srv.url + "/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_every_operation_answers_as_documented(live_server: LiveServer, mode: str) -> None:
    # the Python API rather than schemathesis' pytest plugin (whose lazy fixture loader predates pytest 9)
    from hypothesis import given
    from hypothesis.errors import Unsatisfiable

    operations = _operations(live_server)
    assert len(operations) >= 10, [op.label for op in operations]
    failures: list[str] = []
    for operation in operations:
        strategy = operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode))

        @given(case=strategy)
        @settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case) -> None:
            # schema-valid is not the same as acceptable here: an image URL that is a string but no image, a
            # message list of any shape, a lone surrogate: the server rejects those with a documented 400
            case.call_and_validate(timeout=30, excluded_checks=[schemathesis.checks.positive_data_acceptance])

        try:
            check()
        except Unsatisfiable:  # negative mode: an operation without parameters has no invalid request
            assert mode == "negative", operation.label
        except Exception as err:  # collect every operation's first failure, then fail once
            failures.append(f"{operation.label}: {err}")
    assert not failures, "\n\n".join(failures)
