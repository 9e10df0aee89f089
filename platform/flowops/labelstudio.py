"""Label Studio ML-backend protocol: what the classifier app's /labelstudio routes do.

Label Studio calls an ML backend at `GET /health`, `POST /setup` ({project, schema, hostname,
access_token, model_version}), `POST /predict` ({tasks, project, label_config, params}; answers
{"results": [{"result": [...], "score", "model_version"}, ...]} with one entry per task, in order)
and `POST /webhook` ({"action": "ANNOTATION_CREATED", "annotation": {...}, "task": {...}}).
Predictions come out as image-classification choices for the project's <Choices> tag; annotations
go into the label inbox (`flowops.labels.record_labels`), which the retraining loop reads.

Task images (`data.image`) may be data: URIs, http(s) URLs on this machine or on the Label Studio
host (Label Studio's own `/data/upload/...` and `/data/local-files/?d=...` are read from disk when
the folders are here, else fetched from Label Studio with its token), or paths inside the allowed
folders. Anything else is refused for that task (never a 500).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlparse

import httpx
import numpy as np

from flowops.errors import InvalidInput
from flowops.labels import Label, record_labels
from flowops.settings import Settings

if TYPE_CHECKING:
    from flowops.image_model import Preprocess

LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}
MAX_IMAGE_BYTES = 8 * 1024 * 1024
ANNOTATION_EVENTS = {"ANNOTATION_CREATED", "ANNOTATION_UPDATED"}
_UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-")
_setup: dict[str, dict[str, str]] = {}  # project -> {hostname, access_token} (memory only)


@dataclass(frozen=True)
class LabelSchema:
    from_name: str = "choice"
    to_name: str = "image"
    image_key: str = "image"
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class ImageRoots:
    """Folders task images may be read from."""

    local_files: Path
    upload_dir: Path
    workspace: Path

    @classmethod
    def from_config(cls, cfg: Any, settings: Settings) -> ImageRoots:
        local = cfg.labelstudio_root or os.environ.get("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT")
        upload = cfg.labelstudio_upload_dir or os.environ.get("LABEL_STUDIO_MEDIA_DIR") or \
            str(Path.home() / ".local/share/label-studio/media")
        return cls(Path(local or settings.workspace).resolve(), Path(upload).resolve(),
                   settings.workspace.resolve())


def parse_label_config(config: Any) -> LabelSchema:
    """The <Choices> tag (name, toName, choice values) and the <Image> it points at."""
    if not config:
        return LabelSchema()
    if not isinstance(config, str) or len(config) > 200_000 or "<!ENTITY" in config:
        raise InvalidInput("label_config must be a Label Studio XML config (string, no entities)")
    try:
        root = ET.fromstring(config)
    except ET.ParseError as exc:
        raise InvalidInput(f"label_config is not valid XML: {exc}") from None
    choices = next(root.iter("Choices"), None)
    if choices is None or not choices.get("name") or not choices.get("toName"):
        raise InvalidInput("label_config has no <Choices name=... toName=...> tag to pre-fill")
    to_name = choices.get("toName")
    image = next((el for el in root.iter("Image") if el.get("name") == to_name), None)
    if image is None:
        raise InvalidInput(f"label_config has no <Image name={to_name!r}> that the choices refer to")
    key = (image.get("value") or "$image").lstrip("$")
    values = tuple(c.get("value") for c in choices.iter("Choice") if c.get("value") is not None)
    return LabelSchema(choices.get("name"), to_name, key, values)


def parse_predict_request(body: dict[str, Any], max_tasks: int) -> tuple[list[dict], LabelSchema]:
    tasks = body.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise InvalidInput("'tasks' must be a non-empty list of Label Studio tasks")
    if len(tasks) > max_tasks:
        raise InvalidInput(f"too many tasks: {len(tasks)} (at most {max_tasks} per call)")
    if not all(isinstance(t, dict) for t in tasks):
        raise InvalidInput("each task must be a JSON object with a 'data' object")
    return tasks, parse_label_config(body.get("label_config"))


def remember_setup(body: dict[str, Any]) -> None:
    """Keep the Label Studio host and token (memory only, never logged) to fetch task images."""
    project = str(body.get("project") or "")
    _setup[project.split(".")[0]] = {"hostname": _origin(str(body.get("hostname") or "")),
                                     "access_token": str(body.get("access_token") or "")}


def _origin(url: str) -> str:
    """scheme://host[:port] of a URL ('' when it has none)."""
    try:
        parsed = urlparse(url.strip())
    except ValueError:  # e.g. a malformed IPv6 host
        return ""
    return f"{parsed.scheme}://{parsed.netloc}" if parsed.scheme and parsed.netloc else ""


def label_studio_hosts() -> dict[str, str]:
    """Label Studio origins this backend may fetch task images from -> their API token: those
    sent to POST /setup, and LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY (the names Label Studio's
    own ML backends read) for replicas that never saw a setup call."""
    hosts = {e["hostname"]: e["access_token"] for e in _setup.values() if e["hostname"]}
    env_host = _origin(os.environ.get("LABEL_STUDIO_URL", ""))
    if env_host:
        hosts.setdefault(env_host, os.environ.get("LABEL_STUDIO_API_KEY", ""))
    return hosts


def _inside(root: Path, relative: str) -> Path:
    path = (root / unquote(relative).lstrip("/")).resolve()
    if path != root and root not in path.parents:
        raise InvalidInput("image path leaves the allowed folder")
    return path


def _read_file(path: Path) -> bytes:
    if not path.is_file():
        raise InvalidInput(f"image file {path.name!r} does not exist")
    if path.stat().st_size > MAX_IMAGE_BYTES:
        raise InvalidInput(f"image file {path.name!r} is over {MAX_IMAGE_BYTES} bytes")
    return path.read_bytes()


def _local_url_path(path: str, query: str, roots: ImageRoots) -> Path | None:
    if path.rstrip("/") == "/data/local-files":
        d = parse_qs(query).get("d")
        if not d:
            raise InvalidInput("a /data/local-files/ URL needs ?d=<path>")
        return _inside(roots.local_files, d[0])
    if path.startswith("/data/upload/"):
        return _inside(roots.upload_dir / "upload", path[len("/data/upload/"):])
    return None


async def fetch_task_image(task: dict[str, Any], schema: LabelSchema, roots: ImageRoots) -> bytes:
    data = task.get("data")
    if not isinstance(data, dict):
        raise InvalidInput(f"task {task.get('id')}: 'data' must be an object")
    ref = data.get(schema.image_key)
    if not isinstance(ref, str) or not ref:
        raise InvalidInput(f"task {task.get('id')}: data.{schema.image_key} must be an image URL")
    try:
        return await _fetch(ref, roots)
    except InvalidInput as exc:
        raise InvalidInput(f"task {task.get('id')}: {exc}") from None
    except ValueError as exc:  # urlparse: e.g. a malformed IPv6 host
        raise InvalidInput(f"task {task.get('id')}: not an image URL ({exc})") from None


async def _fetch(ref: str, roots: ImageRoots) -> bytes:
    if ref.startswith("data:"):
        head, _, payload = ref.partition(",")
        if ";base64" not in head:
            raise InvalidInput("data: URIs must be base64-encoded")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInput("data: URI is not valid base64") from None
    url = urlparse(ref)
    if url.scheme in ("http", "https"):
        known = _origin(ref) in label_studio_hosts()
        if (url.hostname or "") not in LOCAL_HOSTS and not known:
            raise InvalidInput("image URLs must point at this machine (localhost) or at the Label Studio "
                               "host (POST /setup, or LABEL_STUDIO_URL)")
        local = _local_url_path(url.path, url.query, roots)
        if local is not None and local.is_file():
            return _read_file(local)
        return await _http_get(ref)
    if url.scheme:
        raise InvalidInput(f"unsupported image URL scheme {url.scheme!r} (data:, http(s), paths)")
    local = _local_url_path(url.path, url.query, roots)
    if local is not None:
        if local.is_file():
            return _read_file(local)
        # Label Studio elsewhere (another machine, a pod): its own relative URL, fetched from it.
        hosts = label_studio_hosts()
        if hosts:
            return await _http_get(next(iter(hosts)) + ref)
        return _read_file(local)  # names the missing file
    path = Path(unquote(url.path))
    for root in (roots.local_files, roots.workspace, roots.upload_dir):
        try:
            candidate = _absolute_inside(root, path) if path.is_absolute() else _inside(root, url.path)
        except InvalidInput:
            continue
        if candidate.is_file():
            return _read_file(candidate)
    raise InvalidInput("image path is not a file inside the Label Studio or workspace folders")


def _absolute_inside(root: Path, path: Path) -> Path:
    resolved = path.resolve()
    if root not in resolved.parents:
        raise InvalidInput("image path leaves the allowed folder")
    return resolved


async def _http_get(url: str) -> bytes:
    origin = _origin(url)
    token = label_studio_hosts().get(origin)
    try:
        async with httpx.AsyncClient(timeout=5.0, follow_redirects=False) as client:
            headers = {"Authorization": await _authorization(client, origin, token)} if token else {}
            resp = await client.get(url, headers=headers)
    except httpx.HTTPError as exc:
        raise InvalidInput(f"could not fetch the image URL ({type(exc).__name__})") from None
    if resp.status_code != 200:
        raise InvalidInput(f"fetching the image URL answered HTTP {resp.status_code}")
    if len(resp.content) > MAX_IMAGE_BYTES:
        raise InvalidInput(f"image is over {MAX_IMAGE_BYTES} bytes")
    return resp.content


_access: dict[str, tuple[float, str]] = {}  # personal access token -> (expiry, access token)


async def _authorization(client: httpx.AsyncClient, origin: str, token: str) -> str:
    """The Authorization header for Label Studio: `Token <key>` for a legacy API token; a
    personal access token (a JWT refresh token, the default since Label Studio 1.18) is exchanged
    at /api/token/refresh for a short-lived access token, sent as `Bearer`."""
    if token.count(".") != 2:
        return f"Token {token}"
    cached = _access.get(token)
    if cached and cached[0] > time.monotonic():
        return f"Bearer {cached[1]}"
    try:
        resp = await client.post(f"{origin}/api/token/refresh", json={"refresh": token})
        access = resp.json().get("access") if resp.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        access = None
    if not isinstance(access, str):
        raise InvalidInput("Label Studio refused the personal access token (POST /api/token/refresh)")
    _access[token] = (time.monotonic() + 240, access)  # access tokens live 5 minutes
    return f"Bearer {access}"


def decode(data: bytes, preprocess: Preprocess) -> np.ndarray:
    """A task's image file -> the (C, H, W) input of the model whose `preprocess` is given."""
    from flowops.image_model import UndecodableImage

    if len(data) > MAX_IMAGE_BYTES:
        raise InvalidInput(f"image is over {MAX_IMAGE_BYTES} bytes")
    try:
        return preprocess.decode(data)
    except UndecodableImage as exc:
        raise InvalidInput(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - whatever else a decoder raises is a bad image
        raise InvalidInput(f"not a decodable image ({type(exc).__name__})") from None


def task_result(prediction: dict[str, Any], schema: LabelSchema) -> dict[str, Any]:
    """One Label Studio prediction: a `choices` result for the project's Choices tag."""
    label, score = prediction["label"], prediction["score"]
    result = []
    if not schema.choices or label in schema.choices:
        result.append({"from_name": schema.from_name, "to_name": schema.to_name, "type": "choices",
                       "value": {"choices": [label]}, "score": score})
    return {"result": result, "score": score, "model_version": prediction["model_version"]}


def task_error(exc: Exception, model_version: str) -> dict[str, Any]:
    return {"result": [], "score": 0.0, "model_version": model_version, "error": str(exc)}


def image_id_of(task: dict[str, Any], image_key: str = "image") -> str | None:
    """The dataset image id of a task: data.image_id or data.id, else the image file's stem."""
    data = task.get("data")
    if not isinstance(data, dict):
        return None
    for key in ("image_id", "id"):
        if data.get(key) not in (None, ""):
            return str(data[key])
    ref = data.get(image_key)
    if not isinstance(ref, str) or not ref or ref.startswith("data:"):
        return None
    try:
        url = urlparse(ref)
    except ValueError:  # e.g. a malformed IPv6 host
        return None
    name = parse_qs(url.query).get("d", [url.path])[0]
    stem = Path(unquote(name)).stem
    if url.path.startswith("/data/upload/"):
        stem = _UPLOAD_PREFIX.sub("", stem)  # Label Studio prefixes uploads with 8 hex chars
    return stem or None


def handle_webhook(settings: Settings, body: dict[str, Any]) -> dict[str, Any]:
    """Record the chosen label of an ANNOTATION_CREATED/UPDATED event; other events are ignored."""
    action = body.get("action")
    if action not in ANNOTATION_EVENTS:
        return {"status": "ignored", "event": str(action)[:64], "recorded": 0}
    annotation, task = body.get("annotation"), body.get("task")
    if not isinstance(annotation, dict) or not isinstance(task, dict) or task.get("id") is None:
        raise InvalidInput(f"{action} needs 'annotation' and 'task' objects with a task id")
    if annotation.get("was_cancelled"):
        return {"status": "ignored", "event": action, "reason": "annotation was skipped",
                "recorded": 0}
    label = None
    results = annotation.get("result")
    for item in results if isinstance(results, list) else []:
        value = item.get("value") if isinstance(item, dict) and item.get("type") == "choices" else None
        values = value.get("choices") if isinstance(value, dict) else None
        if isinstance(values, list) and values:
            label = str(values[0])
            break
    if label is None:
        return {"status": "ignored", "event": action, "reason": "no choice in the annotation",
                "recorded": 0}
    image_id = image_id_of(task)
    if not image_id:
        raise InvalidInput(f"task {task['id']}: cannot tell the image id (data.image_id, data.id "
                           "or an image file name)")
    annotator = annotation.get("completed_by")
    if isinstance(annotator, dict):
        annotator = annotator.get("email") or annotator.get("id")
    n = record_labels(settings, [Label(task_id=f"labelstudio-{task['id']}", image_id=image_id,
                                       label=label, source="labelstudio",
                                       annotator=str(annotator or ""))])
    return {"status": "ok", "event": action, "recorded": n, "task_id": task["id"],
            "image_id": image_id, "label": label}
