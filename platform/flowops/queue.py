"""The labeling queue: pseudo-labels ordered for human review, most uncertain first.

The queue is `predictions.parquet` of a data version (written by `flowops pseudo-label`), minus
the images people have already labeled (the label inbox, labeled manifest rows), sorted by margin
(top-1 minus top-2 probability, smallest first), then by entropy (largest first).

`to_labelstudio_tasks` turns it into Label Studio tasks with the predictions as pre-annotations;
`labelstudio_config` is the labeling config they match (`choice` -> `image`). A sharded version's
images have no file Label Studio could show: `write_label_images` writes the queued ones, from
their shards, under the workspace (Label Studio's local-files root). `simulate_labels` stands in
for people: it labels the head of the queue from the dataset's true answers.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import pandas as pd

from flowops import data, labels
from flowops.errors import FlowOpsError, InvalidInput
from flowops.pseudo_label import human_labeled_ids, read_predictions
from flowops.settings import Settings
from flowops.storage import StorageUnavailable

QUEUE_COLUMNS = ["id", "path", "label", "score", "margin", "entropy", "model_version",
                 "data_version"]
# Label Studio serves local files under /data/local-files/?d=<path relative to its document root>.
# With LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=<FLOWOPS_HOME>/workspace, `data/<manifest path>` works.
LOCAL_FILES_PREFIX = "/data/local-files/?d="
DEFAULT_IMAGE_PREFIX = f"{LOCAL_FILES_PREFIX}data/"
# <workspace>/label-images/<data version>/<file>: the queued images of sharded versions, beside
# (never inside) the DVC-tracked data/ folder, and ignored by the workspace's git.
LABEL_IMAGES = "label-images"
# A file name Label Studio and the ML backend read back unchanged from ?d= (no %, no /, no leading
# dot); any other id gets a cleaned name plus a hash of the id (a `~` no plain name has).
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")
_EXTENSIONS = {"JPEG": ".jpg", "MPO": ".jpg", "TIFF": ".tif"}  # else ".<PIL format>"


def review_queue(settings: Settings, top: int = 50, data_version: str | None = None) -> pd.DataFrame:
    """The `top` most uncertain predictions of a data version that no person has labeled yet."""
    if top < 1:
        raise InvalidInput(f"--top must be at least 1, got {top}")
    version = data.open_version(settings, data_version)
    predictions = read_predictions(version)
    labeled = human_labeled_ids(settings, version.manifest)
    queue = predictions[~predictions["id"].isin(labeled)]
    queue = queue.sort_values(["margin", "entropy", "id"], ascending=[True, False, True],
                              kind="mergesort")
    return queue.head(top).reset_index(drop=True)


def to_labelstudio_tasks(
    queue: pd.DataFrame, image_prefix: str = DEFAULT_IMAGE_PREFIX,
    images: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Label Studio tasks: `data.image` (+ `data.id`), the prediction as a pre-annotation.
    `data.image` is the id's URL in `images` when given there, else `image_prefix` + its path."""
    images = images or {}
    tasks = []
    for row in queue.itertuples(index=False):
        image = images.get(str(row.id)) or f"{image_prefix}{row.path}"
        tasks.append({
            "data": {"image": image, "id": str(row.id),
                     "margin": round(float(row.margin), 6)},
            "predictions": [{
                "model_version": str(row.model_version),
                "score": round(float(row.score), 6),
                "result": [{
                    "from_name": "choice", "to_name": "image", "type": "choices",
                    "value": {"choices": [str(row.label)]},
                }],
            }],
        })
    return tasks


def export_labelstudio(
    settings: Settings, queue: pd.DataFrame, path: Path, image_prefix: str = DEFAULT_IMAGE_PREFIX
) -> int:
    """Write the queue as a Label Studio import file (JSON list of tasks). Returns the count.

    A folder version's images are `image_prefix` + their manifest path; a sharded version's are
    written first (`write_label_images`) and named by local-files URLs, so the file appears only
    once every image it names is there."""
    from flowops.durable import atomic_write_text

    path = Path(path).expanduser()
    if path.parent and not path.parent.is_dir():
        raise InvalidInput(f"cannot write {path}: folder {path.parent} does not exist")
    files = write_label_images(settings, queue)
    images = {image_id: f"{LOCAL_FILES_PREFIX}{rel}" for image_id, rel in files.items()}
    tasks = to_labelstudio_tasks(queue, image_prefix, images)
    atomic_write_text(path, json.dumps(tasks, indent=2))
    return len(tasks)


def write_label_images(settings: Settings, queue: pd.DataFrame) -> dict[str, str]:
    """The queued images of sharded versions (rows whose manifest path is empty) as files under
    `<workspace>/label-images/<data version>/`, read from their shards; files already there are
    kept (each is written atomically, so one there is whole). Returns id -> the file's path
    relative to the workspace. Rows of folder versions are left out: their files are there."""
    from flowops import images as images_lib
    from flowops.durable import atomic_write_bytes, atomic_write_text

    found: dict[str, str] = {}
    top = settings.workspace / LABEL_IMAGES
    for tag, rows in queue[queue["path"] == ""].groupby("data_version", sort=True):
        folder = top / str(tag)
        folder.mkdir(parents=True, exist_ok=True)
        if not (top / ".gitignore").exists():  # a version cut runs `git add -A` in the workspace
            atomic_write_text(top / ".gitignore", "*\n")
        names = {p.stem: p.name for p in folder.iterdir() if not p.name.startswith(".")}
        stems = {str(i): label_image_stem(str(i)) for i in rows["id"]}
        missing = [i for i, stem in stems.items() if stem not in names]
        if missing:
            version = data.open_version(settings, str(tag))
            for image_id, payload in images_lib.iter_bytes(settings, version, missing):
                name = stems[image_id] + image_extension(payload)
                atomic_write_bytes(folder / name, payload)
                names[stems[image_id]] = name
        lacking = sorted(i for i, stem in stems.items() if stem not in names)
        if lacking:
            raise StorageUnavailable(f"data version {tag}: no image for id(s) {lacking[:3]} in "
                                     f"its shards ({len(lacking)} in all)")
        found.update({i: f"{LABEL_IMAGES}/{tag}/{names[stem]}" for i, stem in stems.items()})
    return found


def label_image_stem(image_id: str) -> str:
    """A file name (without extension) for an image id: the id itself when it is plain, else
    its safe characters (at most 60) + `~` + 16 hex digits of its SHA-256, unique per id."""
    if _PLAIN_NAME.fullmatch(image_id):
        return image_id
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "_", image_id)[:60].lstrip(".")
    return f"{cleaned}~{hashlib.sha256(image_id.encode()).hexdigest()[:16]}"


def image_extension(payload: bytes) -> str:
    """The file extension of an encoded image, from its bytes (`.bin` when PIL cannot tell)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(payload)) as img:
            fmt = img.format
    except (UnidentifiedImageError, OSError, ValueError):
        fmt = None
    return _EXTENSIONS.get(fmt, f".{fmt.lower()}") if fmt else ".bin"


def labelstudio_config(classes: list[str]) -> str:
    """The labeling config (XML) the exported tasks match."""
    choices = "\n".join(f"    <Choice value={quoteattr(str(c))}/>" for c in classes)
    return (
        "<View>\n"
        '  <Image name="image" value="$image"/>\n'
        '  <Choices name="choice" toName="image" choice="single" showInLine="true">\n'
        f"{choices}\n"
        "  </Choices>\n"
        "</View>\n"
    )


def _labeling_candidates(settings: Settings, count: int) -> tuple[list[str], str]:
    """Image ids to label next: the review queue's most uncertain first, else a random draw."""
    try:
        ids = [str(x) for x in review_queue(settings, top=count * 3)["id"]]
        if ids:
            return ids, "review queue (most uncertain first)"
    except FlowOpsError:  # no pseudo-label run yet
        pass
    pool = data.open_version(settings).rows("unlabeled")["id"].sample(frac=1.0, random_state=0)
    return [str(x) for x in pool], "unlabeled pool (random order: no review queue yet)"


def simulate_labels(settings: Settings, count: int, annotator: str = "simulated",
                    wrong: bool = False) -> dict[str, Any]:
    """Simulated labelers: reveal the true labels (answers.csv) of the `count` images most worth
    labeling that are still unlabeled and not waiting in the inbox. `wrong` labels them wrongly
    (demo of a bad labeler)."""
    if count < 1:
        raise InvalidInput(f"--count must be at least 1, got {count}")
    version = data.open_version(settings)
    answers = pd.read_csv(version.root / "answers.csv", dtype=str, keep_default_na=False)
    truth = dict(zip(answers["id"], answers["label"], strict=False))
    unlabeled = set(version.rows("unlabeled")["id"])
    pending = {r["image_id"] for r in labels.new_labels(settings)}
    candidates, origin = _labeling_candidates(settings, count)
    chosen = [i for i in candidates if i in unlabeled and i in truth and i not in pending][:count]
    classes = version.classes
    items = []
    for image_id in chosen:
        label = truth[image_id]
        if wrong:
            label = classes[(classes.index(label) + 1) % len(classes)]
        items.append(labels.Label(f"sim-{image_id}", image_id, label, source="simulated",
                                  annotator=annotator))
    return {"recorded": labels.record_labels(settings, items), "requested": count,
            "from": origin, "data_version": version.tag, "inbox": labels.counts(settings)}
