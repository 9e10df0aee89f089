"""The labeling queue: pseudo-labels ordered for human review, most uncertain first.

The queue is `predictions.parquet` of a data version (written by `flowops pseudo-label`), minus
the images people have already labeled (the label inbox, labeled manifest rows), sorted by margin
(top-1 minus top-2 probability, smallest first), then by entropy (largest first).

`to_labelstudio_tasks` turns it into Label Studio tasks with the predictions as pre-annotations;
`labelstudio_config` is the labeling config they match (`choice` -> `image`). `simulate_labels`
stands in for people: it labels the head of the queue from the dataset's true answers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import pandas as pd

from flowops import data, labels
from flowops.errors import FlowOpsError, InvalidInput
from flowops.pseudo_label import human_labeled_ids, read_predictions
from flowops.settings import Settings

QUEUE_COLUMNS = ["id", "path", "label", "score", "margin", "entropy", "model_version",
                 "data_version"]
# Label Studio serves local files under /data/local-files/?d=<path relative to its document root>.
# With LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=<FLOWOPS_HOME>/workspace, `data/<manifest path>` works.
DEFAULT_IMAGE_PREFIX = "/data/local-files/?d=data/"


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
    queue: pd.DataFrame, image_prefix: str = DEFAULT_IMAGE_PREFIX
) -> list[dict[str, Any]]:
    """Label Studio tasks: `data.image` (+ `data.id`), the prediction as a pre-annotation."""
    tasks = []
    for row in queue.itertuples(index=False):
        tasks.append({
            "data": {"image": f"{image_prefix}{row.path}", "id": str(row.id),
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
    queue: pd.DataFrame, path: Path, image_prefix: str = DEFAULT_IMAGE_PREFIX
) -> int:
    """Write the queue as a Label Studio import file (JSON list of tasks). Returns the count."""
    from flowops.durable import atomic_write_text

    tasks = to_labelstudio_tasks(queue, image_prefix)
    path = Path(path).expanduser()
    if path.parent and not path.parent.is_dir():
        raise InvalidInput(f"cannot write {path}: folder {path.parent} does not exist")
    atomic_write_text(path, json.dumps(tasks, indent=2))
    return len(tasks)


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
