"""Property-based fuzzing of every operation in ``/openapi.json``: no input yields a 5xx."""

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402

MAX_EXAMPLES = 20


def test_no_server_errors(served):
    schema = schemathesis.openapi.from_url(served.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    paths = {op.path for op in operations}
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health"} <= paths
    statuses: dict[str, set[int]] = {}

    def fuzz(op):
        @given(case=op.as_strategy())
        @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case):
            # short generations keep the run fast; every other field stays fuzzed
            if isinstance(case.body, dict):
                case.body.setdefault("max_tokens", 4)
            response = case.call(base_url=served.url, timeout=30)
            statuses.setdefault(op.path, set()).add(response.status_code)
            assert response.status_code < 500, (case.body, response.text)

        check()

    for op in operations:
        fuzz(op)
    # the fuzzer really exercised both success and rejection on the generation routes
    for path in ("/v1/chat/completions", "/v1/completions"):
        assert 400 in statuses[path], statuses
    assert statuses["/health"] == {200}
