"""Property-based tests of the server against its own OpenAPI schema (schemathesis): generated requests,
valid and not, with and without a key, never get a 5xx, a status or body the schema does not document,
or a hang."""

from __future__ import annotations

import copy
import itertools

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from server_util import CHATML, running

from lmforge.server.app import create_app
from lmforge.server.keys import create_key


@pytest.fixture(scope="module")
def served(tokenizer, make_model, tmp_path_factory):
    model = make_model("llama", block_size=64)
    model.tokenizer = copy.copy(tokenizer)
    model.tokenizer.chat_template = CHATML
    keys = tmp_path_factory.mktemp("schema") / "keys.json"
    token = create_key(keys, "fuzz", ["admin"])
    app = create_app({"tiny": model}, keys=keys, max_batch=4, max_queue=8)
    with running(app) as url:
        yield app, url, token


def operations(app) -> list:
    """Every operation of the schema the app serves."""
    return [result.ok() for result in schemathesis.openapi.from_dict(app.openapi()).get_all_operations()]


def fuzz(app, examples: int, call) -> int:
    """Draw up to `examples` valid and as many invalid requests per operation, and pass each to `call`;
    how many were sent."""
    sent = []
    for operation, mode in itertools.product(operations(app), schemathesis.GenerationMode):
        @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                  derandomize=True)
        @given(case=operation.as_strategy(mode))
        def run(case):
            call(case)
            sent.append(case)

        try:
            run()
        except Unsatisfiable:  # no invalid request exists (a GET without parameters)
            assert mode == schemathesis.GenerationMode.NEGATIVE
    return len(sent)


def test_with_a_key_no_request_breaks_the_server_or_its_schema(served):
    app, url, token = served
    n = fuzz(app, 10, lambda case: case.call_and_validate(base_url=url, timeout=30,
                                                          headers={"Authorization": f"Bearer {token}"}))
    assert n > 10 * len(operations(app))


def test_without_a_key_every_route_but_health_is_401(served):
    app, url, _ = served

    def call(case):
        response = case.call_and_validate(base_url=url, timeout=30)
        assert response.status_code == (200 if case.path == "/health" else 401), case.path

    assert fuzz(app, 3, call) > len(operations(app))
