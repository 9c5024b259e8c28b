"""Property-based API tests from the server's own OpenAPI schema (schemathesis), on the REAL service:
the tiny exported bundle served by ``mtserve serve`` (uvicorn, onnxruntime) on 127.0.0.1.

Every documented operation gets generated requests (valid and invalid per the schema); every
response must pass schemathesis' default checks: no 5xx (``not_a_server_error``), a documented
status code, content type and headers, a body conforming to the documented schema
(``response_schema_conformance``), schema-invalid data rejected, schema-valid data accepted
(except where no schema can say what is valid: ``CONTENT_CHECKED``). Bounded (a few examples per
operation, a deadline per example, derandomized) to take seconds.

The schema object is built at import from an app on the fake engine (schemathesis' lazy
``from_fixture`` loader touches a pytest internal that pytest 9 removed); a test checks that the
real server serves the same OpenAPI document, and every request goes to the real server
(``mtserve serve`` on 127.0.0.1).
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis.specs.openapi.checks import positive_data_acceptance

from service.app import create_app
from service.settings import Settings
from tests.conftest import TINY_TASKS
from tests.fakes import FakeEngine
from tests.serving import serve

MAX_EXAMPLES = 25
# The one check left out, and only here: positive_data_acceptance (a schema-valid request must not
# be refused). These bodies carry content no JSON Schema can express: /predict takes bytes that must
# decode as an image, /v2 infer a tensor whose data must fill its shape with the model's input size;
# a schema-valid body is legitimately a 422 there. Every other check applies to them too (no 5xx,
# documented status/content type/schema, schema-invalid data refused), and
# tests/test_hostile_inputs.py pins their exact 4xx codes.
CONTENT_CHECKED = {
    "/predict/{task}",
    "/v2/models/{task}/infer",
    "/v2/models/{task}/versions/{model_version}/infer",
}
TINY_VERSION = "1"  # build_tiny_bundle's default version
LIMITS = {"max_wait_ms": 1, "max_body_mb": 1, "max_images_per_request": 4, "warmup": False}


def _document(app) -> dict:
    """The OpenAPI document minus the one line naming the bundle."""
    doc = app.openapi()
    return doc | {"info": {k: v for k, v in doc["info"].items() if k != "summary"}}


def _fake_document() -> dict:
    pixels = Image.MAX_IMAGE_PIXELS  # the Preprocessor sets Pillow's global guard: keep it
    try:
        return _document(create_app(Settings(bundle="unused", **LIMITS), engine=FakeEngine()))
    finally:
        Image.MAX_IMAGE_PIXELS = pixels


DOCUMENT = _fake_document()
schema = schemathesis.openapi.from_dict(DOCUMENT)


@schema.hook
def flatmap_path_parameters(context, path_parameters: dict):
    """``{task}`` and ``{model_version}`` are any strings in the schema: left alone, nearly every
    request is a 404 for a random name. Each is, independently, either a value the bundle serves or
    the generated one, so the routes behind the 404 get fuzzed too (and a served task with a wrong
    version)."""
    if not path_parameters:
        return st.just(path_parameters)
    served = {"task": sorted(TINY_TASKS), "model_version": [TINY_VERSION]}
    return st.fixed_dictionaries(
        {
            k: st.sampled_from(served[k]) | st.just(v) if k in served else st.just(v)
            for k, v in path_parameters.items()
        }
    )


@pytest.fixture(scope="module")
def server(tiny_bundle):
    """``mtserve serve`` on 127.0.0.1 (a real uvicorn: schemathesis ends an in-process app's lifespan
    after every test, and a service does not start twice); yields its base URL."""
    args = ("--threads", "1", "--preprocess-workers", "1", "--log-level", "warning", "--max-wait-ms", "1")
    args += ("--max-body-mb", "1", "--max-images-per-request", "4")
    with serve(tiny_bundle, *args, env={"MTSERVE_WARMUP": "false"}) as (_, url, _log):
        yield url


def test_the_server_serves_the_schema_under_test(server):
    served = httpx.get(server + "/openapi.json", timeout=10).json()
    assert served | {"info": {k: v for k, v in served["info"].items() if k != "summary"}} == DOCUMENT


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=2000,  # ms per example; the 2-core test machine is shared
    suppress_health_check=list(HealthCheck),
    database=None,  # no .hypothesis/ directory in the checkout
    derandomize=True,  # the same examples every run: a failure here reproduces
)
def test_api_conforms_to_its_openapi_schema(server, case):
    excluded = [positive_data_acceptance] if case.operation.path in CONTENT_CHECKED else []
    case.call_and_validate(base_url=server, timeout=30, excluded_checks=excluded)
