"""What the classifier app is given: its deployment arguments and the bodies of its requests.

Light on purpose (pydantic only): the CLI, the loop controller and `serve_apps/` import it to
check arguments before anything starts.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from flowops.errors import InvalidInput, invalid_input

if TYPE_CHECKING:
    import numpy as np

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


class B64Instance(BaseModel):
    model_config = ConfigDict(extra="forbid")
    b64: str = Field(..., description="A PNG or JPEG file, base64-encoded.")


class PredictRequest(BaseModel):
    """KServe / TF-Serving v1: each instance is {"b64": ...} or a 2-D array of pixel values 0-255."""

    model_config = ConfigDict(extra="forbid")
    instances: list[B64Instance | list[list[float]]] = Field(..., min_length=1)
    routing_key: str | None = Field(None, max_length=256, description="Sticky routing key.")

    def images(self, image_size: int, max_instances: int) -> list[np.ndarray]:
        """The instances as (S, S) float arrays in [0, 1]; InvalidInput names the bad instance."""
        if len(self.instances) > max_instances:
            raise InvalidInput(f"too many instances: {len(self.instances)} (at most "
                               f"{max_instances} per call)")
        return [_decode(instance, i, image_size) for i, instance in enumerate(self.instances)]


def _decode(instance: B64Instance | list[list[float]], index: int, image_size: int) -> np.ndarray:
    from flowops.model import decode_image, pixels_to_array

    try:
        if isinstance(instance, B64Instance):
            try:
                data = base64.b64decode(instance.b64, validate=True)
            except (binascii.Error, ValueError):
                raise InvalidInput("b64 is not valid base64") from None
            return decode_image(data, image_size)
        return pixels_to_array(instance, image_size)
    except InvalidInput as exc:
        raise InvalidInput(f"instances[{index}]: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - e.g. ragged rows, decompression bombs
        raise InvalidInput(f"instances[{index}]: cannot read image ({type(exc).__name__})") from None


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    request_id: str = Field(..., min_length=1, max_length=128)
    label: str = Field(..., min_length=1, max_length=128)


class RoutingUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    stable: str | None = Field(None, min_length=1, max_length=128)
    canary: str | None = Field(None, max_length=128, description="null or '' removes the canary.")
    weight: int | None = Field(None, ge=0, le=100)
    shadow_pct: int | None = Field(None, ge=0, le=100)
    sticky_images: bool | None = None
    canary_fallback: bool | None = None
