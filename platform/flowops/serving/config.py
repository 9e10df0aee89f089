"""What the classifier app is given: its deployment arguments and the bodies of its requests.

Light on purpose (pydantic only): the CLI, the loop controller and `serve_apps/` import it to
check arguments before anything starts.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag

from flowops.errors import InvalidInput, invalid_input
from flowops.refs import model_ref_pattern

if TYPE_CHECKING:
    import numpy as np

    from flowops.image_model import Preprocess

APP_NAME = "classifier"
ROUTING_FIELDS = ("stable", "canary", "weight", "shadow_pct", "sticky_images", "canary_fallback")


class ServeAppConfig(BaseModel):
    """Arguments of the classifier app (`build_app(args)`, the Serve config file, `serve deploy`)."""

    # Defaults are validated too (num_gpus 0 -> 0.0): the deploying process and the replica, which
    # gets the arguments after a round trip, must compute the same `deployment_hash`.
    model_config = ConfigDict(extra="forbid", validate_default=True)

    name: str = Field(APP_NAME, description="Serve application name (also names its state actor).")
    model_name: str | None = Field(None, description="Registered model (default: settings).")
    stable: str = Field("production", description="Stable version number or alias.")
    canary: str | None = Field(None, description="Canary version number or alias; none by default.")
    weight: int = Field(0, ge=0, le=100, description="Percent of traffic sent to the canary.")
    shadow_pct: int = Field(0, ge=0, le=100, description="Percent of stable traffic mirrored to "
                            "the canary (its answers are compared, never returned).")
    sticky_images: bool = Field(False, description="Route by a hash of the image when a request "
                                "has no X-Routing-Key (the same image always gets the same version).")
    canary_fallback: bool = Field(True, description="Answer from stable when the canary fails.")
    num_replicas: int = Field(1, ge=1, le=64)
    num_cpus: float = Field(0.2, gt=0, le=64, description="CPUs per replica (fractional).")
    num_gpus: float = Field(0, ge=0, le=8, description="GPUs per replica (models run on cuda).")
    resources: dict[str, Annotated[float, Field(gt=0)]] = Field(
        default_factory=dict, description="Custom Ray resources each replica needs: places the "
        "replicas on the nodes that have them (a worker group's resource, or node:<ip>).")
    max_replicas_per_node: int | None = Field(None, ge=1, le=64, description="Most replicas on "
                                              "one node: 1 spreads them over the nodes (a host "
                                              "lost costs one replica). Default: no limit.")
    max_ongoing_requests: int = Field(64, ge=1, le=10_000)
    max_batch_size: int = Field(32, ge=1, le=1024)
    batch_wait_timeout_s: float = Field(0.0, ge=0, le=1)
    max_instances: int = Field(64, ge=1, le=10_000, description="Images per /predict call.")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Request body limit.")
    require_api_key: bool = Field(False, description="Prediction routes need FLOWOPS_API_KEY.")
    admin_key_file: str | None = Field(None, description="File holding the admin key.")
    api_key_file: str | None = Field(None, description="File holding the prediction API key.")
    home: str | None = Field(None, description="FLOWOPS_HOME for the replicas (default: env).")
    tracking_uri: str | None = Field(None, description="MLflow URI for the replicas (default: env).")
    storage_uri: str | None = Field(None, description="FLOWOPS_STORAGE_URI for the replicas (live-input "
                                    "windows; default: env).")
    storage_endpoint_url: str | None = Field(None, description="FLOWOPS_STORAGE_ENDPOINT_URL for the "
                                             "replicas (default: env).")
    input_window_s: float = Field(60.0, ge=0, le=86_400, description="Seconds of traffic per "
                                  "live-input window written for drift detection (0: none).")
    input_window_max: int = Field(2000, ge=10, le=100_000, description="Images kept per window "
                                  "(a uniform sample of the traffic).")
    input_window_min: int = Field(50, ge=1, description="Fewest images a window is written with.")
    labelstudio_root: str | None = Field(None, description="Folder that Label Studio's "
                                         "/data/local-files/?d= paths are relative to.")
    labelstudio_upload_dir: str | None = Field(None, description="Label Studio's media folder "
                                               "(for /data/upload/... image URLs).")

    def deployment_hash(self) -> str:
        """Hash of the options that need a redeploy (everything except the runtime routing)."""
        fixed = self.model_dump(exclude={*ROUTING_FIELDS, "admin_key_file", "api_key_file"})
        return hashlib.sha256(json.dumps(fixed, sort_keys=True).encode()).hexdigest()[:16]

    def routing(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in ROUTING_FIELDS}


def parse_app_config(args: dict[str, Any] | None) -> ServeAppConfig:
    """The app's arguments, checked (InvalidInput names the first wrong one)."""
    with invalid_input("invalid serve app argument"):
        return ServeAppConfig.model_validate(args or {})


# Request bodies ----------------------------------------------------------------------------------


# The constraints on instances that JSON Schema cannot state: the rows of a pixel array have equal
# lengths and the pixels of a colour array equal channel counts (checked by `_rectangular` and
# `_one_channel_count`, said in the schema's descriptions). What a base64 string must
# decode to (an image file) is named by the custom string format IMAGE_FORMAT, so that a client or a
# fuzzer can be taught to make one (tests/integration/test_openapi.py does).
B64_PATTERN = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
IMAGE_FORMAT = "image-base64"
# Likewise for Label Studio: a task's image reference, and a label config (XML).
IMAGE_URL_FORMAT = "image-url"
LABEL_CONFIG_FORMAT = "label-studio-config"


class B64Instance(BaseModel):
    model_config = ConfigDict(extra="forbid", title="ImageFile")
    b64: str = Field(..., min_length=4, pattern=B64_PATTERN,
                     description="An image file (PNG, JPEG, WebP, ...), base64-encoded (standard "
                     "alphabet, padded); any size and colour mode: brought to the model's input by "
                     "its own preprocessing (EXIF orientation, channels, size, normalisation).",
                     json_schema_extra={"format": IMAGE_FORMAT, "contentEncoding": "base64",
                                        "contentMediaType": "image/*"})


def _rectangular(rows: list[list[Any]]) -> list[list[Any]]:
    width = len(rows[0])
    for i, row in enumerate(rows):
        if len(row) != width:
            raise ValueError(f"the rows of a pixel array must have one length (height x width): "
                             f"row 0 has {width} values, row {i} has {len(row)}")
    return rows


def _one_channel_count(rows: list[list[list[float]]]) -> list[list[list[float]]]:
    channels = len(rows[0][0])
    for i, row in enumerate(rows):
        for j, pixel in enumerate(row):
            if len(pixel) != channels:
                raise ValueError(f"every pixel of a colour pixel array has the same number of "
                                 f"values: pixel [0][0] has {channels}, pixel [{i}][{j}] has "
                                 f"{len(pixel)}")
    if channels == 2:
        raise ValueError("a pixel holds 1 (gray), 3 (RGB) or 4 (RGBA) values, not 2")
    return rows


Pixel = Annotated[float, Field(ge=0, le=255, allow_inf_nan=False)]
PixelArray = Annotated[
    list[Annotated[list[Pixel], Field(min_length=1)]],
    Field(min_length=1, title="PixelArray",
          description="A grayscale image as a 2-D array (height x width) of pixel values 0-255; every "
          "row has the same length. Any size: brought to the model's input by its preprocessing."),
    AfterValidator(_rectangular),
]
ColourPixel = Annotated[list[Pixel], Field(min_length=1, max_length=4, json_schema_extra={
    "not": {"minItems": 2, "maxItems": 2}})]
ColourPixelArray = Annotated[
    list[Annotated[list[ColourPixel], Field(min_length=1)]],
    Field(min_length=1, title="ColourPixelArray",
          description="A colour image as a 3-D array (height x width x channels) of pixel values "
          "0-255, 1 (gray), 3 (RGB) or 4 (RGBA, alpha composited on black) values per pixel; every "
          "row has the same length and every pixel the same number of values. Any size: brought "
          "to the model's input by its preprocessing."),
    AfterValidator(_rectangular), AfterValidator(_one_channel_count),
]


def _instance_kind(value: Any) -> str | None:
    """An object is an image file; an array whose first pixel is a list, a colour pixel array."""
    if isinstance(value, (dict, B64Instance)):
        return "image_file"
    if not isinstance(value, list):
        return None
    try:
        return "colour_pixel_array" if isinstance(value[0][0], list) else "pixel_array"
    except (IndexError, KeyError, TypeError):
        return "pixel_array"


Instance = Annotated[
    Annotated[B64Instance, Tag("image_file")] | Annotated[PixelArray, Tag("pixel_array")]
    | Annotated[ColourPixelArray, Tag("colour_pixel_array")],
    Discriminator(_instance_kind, custom_error_type="instance",
                  custom_error_message='an instance is {"b64": "<base64 image file>"} or an array '
                  "of pixel values 0-255 (height x width, or height x width x channels)"),
]


class PredictRequest(BaseModel):
    """KServe / TF-Serving v1: each instance is {"b64": ...} or an array of pixel values 0-255
    (height x width grayscale, or height x width x channels colour)."""

    model_config = ConfigDict(extra="forbid")
    instances: list[Instance] = Field(..., min_length=1, description="The images to classify (at "
                                      "most the app's max_instances per call: the document served "
                                      "by the app states its limit).")
    routing_key: str | None = Field(None, max_length=256, description="Sticky routing key (the "
                                    "X-Routing-Key header wins).")

    def images(self, max_instances: int) -> RequestImages:
        """The instances, decoded on demand per model preprocessing; InvalidInput when too many."""
        if len(self.instances) > max_instances:
            raise InvalidInput(f"too many instances: {len(self.instances)} (at most "
                               f"{max_instances} per call)")
        instances = list(self.instances)
        return RequestImages(lambda preprocess: [_decode(instance, i, preprocess)
                                                 for i, instance in enumerate(instances)])


class RequestImages:
    """A request's images as the tensors of each model that sees them, decoded once per
    preprocessing: the stable and the canary version may be different tasks (another size,
    channels or normalisation), so each gets the images the way it was trained on them."""

    def __init__(self, decode: Callable[[Preprocess], list[np.ndarray]]) -> None:
        self._decode = decode
        self._arrays: dict[Preprocess, list[np.ndarray]] = {}

    def arrays(self, preprocess: Preprocess) -> list[np.ndarray]:
        """(C, H, W) float32 arrays for `preprocess`; InvalidInput names the bad instance."""
        if preprocess not in self._arrays:
            self._arrays[preprocess] = self._decode(preprocess)
        return self._arrays[preprocess]


def _decode(instance: B64Instance | list, index: int, preprocess: Preprocess) -> np.ndarray:
    from flowops.image_model import UndecodableImage

    try:
        if isinstance(instance, B64Instance):
            try:
                data = base64.b64decode(instance.b64, validate=True)
            except (binascii.Error, ValueError):
                raise InvalidInput("b64 is not valid base64") from None
            return preprocess.decode(data)
        return preprocess.pixels(instance)
    except (InvalidInput, UndecodableImage) as exc:
        raise InvalidInput(f"instances[{index}]: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - whatever else a decoder raises is a bad image
        raise InvalidInput(f"instances[{index}]: cannot read image ({type(exc).__name__})") from None


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    request_id: str = Field(..., min_length=1, max_length=128)
    label: str = Field(..., min_length=1, max_length=128)


def _leave_out_none_defaults(schema: dict[str, Any]) -> None:
    """A field that may be left out but not sent as null: no `"default": null` in its schema."""
    for prop in schema.get("properties", {}).values():
        if "default" in prop and prop["default"] is None and "anyOf" not in prop:
            del prop["default"]


class RoutingUpdate(BaseModel):
    """Fields left out keep their value (only the canary may be null: null removes it). A version
    is a number, an alias or a models:/ URI of the app's model."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_leave_out_none_defaults)
    stable: str = Field(None, min_length=1, max_length=128, pattern=model_ref_pattern(),
                        description="Version number, alias (production) or models:/ URI.")
    canary: str | None = Field(None, max_length=128, pattern=f"^$|{model_ref_pattern()}",
                               description="Like stable; null or '' removes the canary.")
    weight: int = Field(None, ge=0, le=100, description="Percent of traffic to the canary (0 "
                        "without a canary).")
    shadow_pct: int = Field(None, ge=0, le=100, description="Percent of stable traffic mirrored "
                            "to the canary.")
    sticky_images: bool = Field(None, description="Route by a hash of the image when a request "
                                "has no routing key.")
    canary_fallback: bool = Field(None, description="Answer from stable when the canary fails.")


# Label Studio ML-backend bodies: what Label Studio sends, open to the fields it adds over time.


class LabelStudioSetup(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    project: str | int | None = Field(None, description="'<project id>.<created at>'")
    label_config: str | None = Field(None, alias="schema", description="The project's labeling "
                                     "config (XML).")
    hostname: str | None = Field(None, description="Label Studio's URL (task images are fetched "
                                 "from it).")
    access_token: str | None = Field(None, description="Label Studio token (kept in memory, "
                                     "never logged).")
    model_version: str | None = None
    extra_params: dict[str, Any] | None = None


class LabelStudioTaskData(BaseModel):
    model_config = ConfigDict(extra="allow", json_schema_extra=_leave_out_none_defaults)
    image: str = Field(None, min_length=1, description="The task's image, under the key the label "
                       "config's <Image value=\"$key\"> names ('image' by default): a "
                       "data:image/...;base64 URI, Label Studio's /data/upload/... or "
                       "/data/local-files/?d=... path, or an http(s) URL on this machine or the "
                       "Label Studio host.", json_schema_extra={"format": IMAGE_URL_FORMAT})


class LabelStudioTask(BaseModel):
    """One task; one whose image cannot be read gets an error result (the others are answered)."""

    model_config = ConfigDict(extra="allow")
    id: int | str | None = None
    data: LabelStudioTaskData


LabelConfig = Annotated[str, Field(max_length=200_000, json_schema_extra={
    "format": LABEL_CONFIG_FORMAT, "contentMediaType": "application/xml"})]


class LabelStudioPredict(BaseModel):
    # Without a label config the image key is 'image': every task needs it then (what a config
    # names instead is inside its XML, out of the schema's reach).
    model_config = ConfigDict(extra="allow", json_schema_extra={
        "if": {"anyOf": [{"not": {"required": ["label_config"]}},
                         {"properties": {"label_config": {"type": "null"}}}]},
        "then": {"properties": {"tasks": {"items": {"properties": {
            "data": {"required": ["image"]}}}}}},
    })
    tasks: list[LabelStudioTask] = Field(..., min_length=1, description="At most the app's "
                                         "max_instances tasks per call.")
    label_config: LabelConfig | None = Field(None, description="The project's labeling config: "
                                             "XML with a <Choices name toName> tag and the <Image> "
                                             "it names, no entities. Default: choices 'choice' on "
                                             "image 'image'.")
    project: str | int | None = None
    model_version: str | None = None
    params: dict[str, Any] | None = None


ANNOTATION_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED")


class LabelStudioWebhook(BaseModel):
    """An event of a project webhook: annotation events record the chosen label; others answer 200
    and are ignored."""

    model_config = ConfigDict(extra="allow", json_schema_extra={
        "if": {"properties": {"action": {"enum": list(ANNOTATION_EVENTS)}}, "required": ["action"]},
        "then": {"required": ["annotation", "task"], "properties": {
            "annotation": {"type": "object"},
            "task": {"type": "object", "required": ["id"], "properties": {
                "id": {"type": ["integer", "string"]}}}}},
    })
    action: str | None = Field(None, description="ANNOTATION_CREATED / ANNOTATION_UPDATED need "
                               "'annotation' and 'task' (with its id); other events are ignored.")
    annotation: dict[str, Any] | None = None
    task: dict[str, Any] | None = None
