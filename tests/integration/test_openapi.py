"""The classifier app's OpenAPI document against the app itself, from outside: schemathesis reads
/openapi.json from the live app (the session's stack, two replicas, a registered model) and sends
every operation requests generated from it, over HTTP to 127.0.0.1.

For every operation: no 5xx, and every answer is one the document declares (status, content type,
body schema, headers). For every operation with inputs the document must not be looser than
validation: of the requests generated from it, at most 20 % may be rejected as invalid (400/422),
and at least 80 % must be answered 2xx. Except /feedback, which answers 404 for an unknown
request_id, and PUT /routing, which answers 404/409 for a version that does not exist or equals
stable: refusals of what the request names, not of its shape, so those two are held to the invalid
share only. (Promote gets a canary before each request: without one it is a 409 by design.)

What JSON Schema cannot state is taught to the generator, nothing else: the custom string formats
the document names (flowops.serving.config: IMAGE_FORMAT, a base64 image file; IMAGE_URL_FORMAT, a
Label Studio task image, made here as data: URIs; LABEL_CONFIG_FORMAT, a labeling XML) get
strategies (PNG/JPEG/BMP/GIF files, configs with an <Image> and its <Choices>), and the rows of a
pixel array have one length and the pixels of a colour array one channel count (stated in the
descriptions; generated arrays are cut to their shortest row and fewest channels).

Measured on 2 cores (schemathesis 4.32.5, printed with -s): 2xx for /predict 50/50, LS setup and
webhook 25/25, LS predict 24/25 (one 422: no task had an image), promote 10/10, rollback 5/5;
PUT /routing 16/25 (9 x 404: generated versions that do not exist), /feedback 25 x 404; no 400,
no 5xx, every answer as documented; ~25 s of requests. With the pixel range and the version
pattern taken out of the document (validation unchanged), /predict was 76 % invalid and PUT
/routing 32 %: both failed.
"""

from __future__ import annotations

import base64
import collections
import io
import time
from dataclasses import dataclass, field

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from tests.integration.conftest_serving import fit_classifier, register_version

pytestmark = pytest.mark.integration

# Examples per operation (25-50 for bodies, a few for routes without inputs), in the order run:
# the routing changes last, so that nothing before them runs on a fuzzed routing.
OPERATIONS = {
    "POST /predict": 50,
    "POST /feedback": 25,
    "GET /health": 3,
    "GET /routing": 3,
    "GET /ledger": 3,
    "GET /labelstudio": 3,
    "GET /labelstudio/": 3,
    "GET /labelstudio/health": 3,
    "POST /labelstudio/setup": 25,
    "POST /labelstudio/predict": 25,
    "POST /labelstudio/webhook": 25,
    "PUT /routing": 25,
    "POST /routing/promote": 10,
    "POST /routing/rollback": 5,
}
ADMIN_OPERATIONS = {"PUT /routing", "POST /routing/promote", "POST /routing/rollback"}
# Every operation with inputs: at most 20 % rejected as invalid. Those whose answer does not depend
# on what exists (a request id, a version): at least 80 % accepted.
MAX_INVALID = dict.fromkeys(["POST /predict", "POST /feedback", "PUT /routing",
                             "POST /routing/promote", "POST /routing/rollback",
                             "POST /labelstudio/setup", "POST /labelstudio/predict",
                             "POST /labelstudio/webhook"], 0.2)
MIN_ACCEPTED = dict.fromkeys(["POST /predict", "POST /routing/promote", "POST /routing/rollback",
                              "POST /labelstudio/setup", "POST /labelstudio/predict",
                              "POST /labelstudio/webhook"], 0.8)


def _image_file(width: int, height: int, fmt: str, seed: int) -> tuple[str, str]:
    """(format, base64 of an image file of that format)."""
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format=fmt)
    return fmt.lower(), base64.b64encode(buf.getvalue()).decode()


IMAGE_FILES = st.builds(_image_file, st.integers(1, 40), st.integers(1, 40),
                        st.sampled_from(["PNG", "JPEG", "BMP", "GIF"]), st.integers(0, 2**32 - 1))
NAMES = st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,11}", fullmatch=True)


def _label_config(image: str, choices: str, values: list[str]) -> str:
    options = "".join(f'<Choice value="{v}"/>' for v in values)
    return (f'<View><Image name="{image}" value="$image"/><Choices name="{choices}" '
            f'toName="{image}" choice="single">{options}</Choices></View>')


FORMATS = {  # the formats the document names (flowops.serving.config) -> what they are
    "IMAGE_FORMAT": IMAGE_FILES.map(lambda f: f[1]),
    "IMAGE_URL_FORMAT": IMAGE_FILES.map(lambda f: f"data:image/{f[0]};base64,{f[1]}"),
    "LABEL_CONFIG_FORMAT": st.builds(_label_config, NAMES, NAMES,
                                     st.lists(st.sampled_from("0123456789") | NAMES, max_size=10)),
}


def _rectangular(body: object) -> None:
    """Cut the rows of each pixel-array instance to its shortest row, and the pixels of a colour
    array to its fewest channels (in place)."""
    instances = body.get("instances") if isinstance(body, dict) else None
    for instance in instances if isinstance(instances, list) else []:
        if isinstance(instance, list) and instance and all(isinstance(r, list) for r in instance):
            width = min(len(row) for row in instance)
            instance[:] = [row[:width] for row in instance]
            pixels = [p for row in instance for p in row]
            if pixels and all(isinstance(p, list) for p in pixels):
                channels = min(len(p) for p in pixels)
                instance[:] = [[p[:channels] for p in row] for row in instance]


@dataclass
class Report:
    statuses: collections.Counter = field(default_factory=collections.Counter)
    nonconforming: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.statuses.values())

    def share(self, predicate) -> float:
        return sum(n for code, n in self.statuses.items() if predicate(code)) / max(self.total, 1)

    @property
    def accepted(self) -> float:
        return self.share(lambda code: 200 <= code < 300)

    @property
    def invalid(self) -> float:
        return self.share(lambda code: code in (400, 422))

    @property
    def server_errors(self) -> int:
        return sum(n for code, n in self.statuses.items() if code >= 500)


@pytest.fixture(scope="module")
def live(stack):
    """Two good versions ('good' serves as production), the app deployed with two replicas."""
    from flowops import serving
    from flowops.tracking import configure_mlflow

    versions = {"good": register_version(stack, fit_classifier(seed=0), alias="production"),
                "other": register_version(stack, fit_classifier(seed=1))}
    serving.deploy(stack, num_replicas=2)
    yield stack, versions
    _reset(stack, versions)
    configure_mlflow(stack).set_registered_model_alias(stack.model_name, "production",
                                                       versions["good"])


def _reset(settings, versions) -> None:
    from flowops import serving

    serving.update_routing(settings, stable=versions["good"], canary="", weight=0, shadow_pct=0,
                           sticky_images=False, canary_fallback=True)


@pytest.fixture(scope="module")
def schema(live):
    import schemathesis
    from schemathesis.specs.openapi.formats import unregister_string_format

    from flowops.serving import config

    settings, _ = live
    for constant, strategy in FORMATS.items():
        schemathesis.openapi.format(getattr(config, constant), strategy)
    yield schemathesis.openapi.from_url(f"{settings.serve_url}/openapi.json", timeout=30)
    for constant in FORMATS:
        unregister_string_format(getattr(config, constant))


REPORTS: dict[str, Report] = {}


def _fuzz(schema, settings, label: str, examples: int, headers: dict[str, str],
          before=None) -> Report:
    """`examples` requests generated for one operation; statuses and conformance failures."""
    from schemathesis.core.failures import FailureGroup
    from schemathesis.specs.openapi import checks

    method, path = label.split(" ", 1)
    operation = schema[path][method]
    report = Report()
    conformance = [checks.status_code_conformance, checks.content_type_conformance,
                   checks.response_schema_conformance, checks.response_headers_conformance]

    @hsettings(max_examples=examples, deadline=None, derandomize=True, database=None,
               phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy())
    def run(case) -> None:
        if before:
            before()
        _rectangular(case.body)
        response = case.call(base_url=settings.serve_url, headers=headers, timeout=60)
        report.statuses[response.status_code] += 1
        try:
            case.validate_response(response, checks=conformance, headers=headers)
        except FailureGroup as exc:
            report.nonconforming.append(f"{response.status_code} {response.text[:200]}: "
                                        + "; ".join(f.title for f in exc.exceptions))

    start = time.monotonic()
    run()
    report.seconds = time.monotonic() - start
    return report


def test_every_operation_is_fuzzed_and_the_replicas_limits_are_documented(live, schema):
    from flowops.refs import model_ref_pattern
    from flowops.serving.config import ServeAppConfig

    settings, _ = live
    documented = {f"{op.ok().method.upper()} {op.ok().path}" for op in schema.get_all_operations()}
    assert documented == set(OPERATIONS)
    schemas = schema.raw_schema["components"]["schemas"]
    default_max = ServeAppConfig.model_fields["max_instances"].default
    assert schemas["PredictRequest"]["properties"]["instances"]["maxItems"] == default_max
    stable = schemas["RoutingUpdate"]["properties"]["stable"]
    assert stable["pattern"] == model_ref_pattern(settings.model_name)
    docs = httpx.get(f"{settings.serve_url}/docs", timeout=30)
    assert docs.status_code == 200 and "/openapi.json" in docs.text


@pytest.mark.parametrize("label", list(OPERATIONS))
def test_generated_requests_get_documented_answers(live, schema, label):
    from flowops import serving

    settings, versions = live
    headers = {"X-API-Key": serving.admin_key(settings)} if label in ADMIN_OPERATIONS else {}
    before = None
    if label == "POST /routing/promote":
        def before() -> None:  # a canary to promote: the version that is not stable now
            stable = serving.routing_status(settings)["stable"]
            serving.set_canary(settings, versions["other" if stable == versions["good"] else "good"])

    try:
        report = REPORTS[label] = _fuzz(schema, settings, label, OPERATIONS[label], headers, before)
    finally:
        if label in ADMIN_OPERATIONS:
            _reset(settings, versions)
    print(f"\n{label}: {dict(sorted(report.statuses.items()))} accepted {report.accepted:.0%} "
          f"invalid {report.invalid:.0%} in {report.seconds:.1f}s")
    assert report.server_errors == 0, report.statuses
    assert not report.nonconforming, report.nonconforming[:5]
    if label in MAX_INVALID:
        assert report.invalid <= MAX_INVALID[label], (report.statuses, "the schema is looser than "
                                                      "the validation")
    if label in MIN_ACCEPTED:
        assert report.accepted >= MIN_ACCEPTED[label], report.statuses
