"""The data_check workload: validate a data version, log the summary to MLflow, fail if invalid."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from flowops import data, images, tracking
from flowops.entrypoint import print_result
from flowops.errors import InvalidInput
from flowops.settings import Settings

EXPERIMENT = "data-checks"


class DataCheckConfig(BaseModel):
    """Which data version to validate (the `data_check` job's config)."""

    model_config = ConfigDict(extra="forbid")

    data_version: str | None = Field(None, description="Data version id (vN); None = latest.")


def check_version(settings: Settings, version: str | None = None) -> dict[str, Any]:
    """Validate a data version: manifest schema, every image decodes, counts per class and pool.

    The images are read where they are (`images.iter_bytes`: a sharded version's shards from the
    storage URI, each verified against its checksum; a folder version's files). A damaged or
    missing shard refuses the version (StorageUnavailable, exit 5)."""
    import io

    from PIL import Image, UnidentifiedImageError

    opened = data.open_version(settings, version)
    manifest, meta = opened.manifest, opened.meta
    problems: list[str] = []
    classes = set(meta.get("classes", []))
    if manifest["id"].duplicated().any():
        problems.append(f"{int(manifest['id'].duplicated().sum())} duplicate id(s)")
    bad_split = sorted(set(manifest["split"]) - set(data.SPLITS) - {"pseudo"})
    if bad_split:
        problems.append(f"unknown split(s) {bad_split}; allowed {list(data.SPLITS)}")
    labeled = manifest[manifest["split"].isin(["train", "holdout"])]
    bad_labels = sorted(set(labeled["label"]) - classes)
    if bad_labels:
        problems.append(f"label(s) {bad_labels} not among classes {sorted(classes)}")
    shown = dict(zip(manifest["id"], manifest["path"].where(manifest["path"] != "", manifest["id"]),
                     strict=True))
    undecodable, seen = [], set()
    try:
        for image_id, payload in images.iter_bytes(settings, opened, manifest["id"]):
            seen.add(image_id)
            try:
                with Image.open(io.BytesIO(payload)) as img:
                    img.load()
            except (UnidentifiedImageError, OSError):
                undecodable.append(shown[image_id])
    except InvalidInput as exc:  # a folder version's file that cannot be read
        problems.append(str(exc))
    else:  # an id its shard does not hold
        undecodable += [shown[i] for i in manifest["id"] if i not in seen]
    if undecodable:
        problems.append(f"{len(undecodable)} image(s) missing or not decodable, "
                        f"e.g. {', '.join(undecodable[:3])}")
    counts, class_counts = data.summarize(manifest, meta["classes"])
    return {"version": opened.tag, "ok": not problems, "problems": problems, "images": len(manifest),
            "counts": counts, "class_counts": class_counts, "classes": meta["classes"]}


def run_data_check(settings: Settings, config: DataCheckConfig) -> dict[str, Any]:
    import mlflow

    summary = check_version(settings, config.data_version)
    with tracking.start_run(settings, EXPERIMENT, run_name=f"data-check-{summary['version']}"):
        mlflow.set_tags({"data_version": summary["version"], "workload": "data_check",
                         "ok": str(summary["ok"]).lower()})
        mlflow.log_param("data_version", summary["version"])
        mlflow.log_metric("images", summary["images"])
        for split, n in summary["counts"].items():
            mlflow.log_metric(f"count_{split}", n)
        mlflow.log_dict(summary, "data_check.json")
    print_result(summary)  # the job's RESULT line, also when the version is invalid
    if not summary["ok"]:
        raise InvalidInput(f"data version {summary['version']} is invalid: "
                           + "; ".join(summary["problems"]))
    print(f"data version {summary['version']} OK: {summary['images']} images, {summary['counts']}")
    return summary
