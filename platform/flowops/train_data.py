"""Training data through Ray Train's dataset integration: streamed, never inside the loop's config.

The driver opens the run's rows (the train slice, pseudo-labels in place, and the validation
slice) as Ray Datasets read where the version keeps its images (`flowops.images`: shards straight
from the storage URI on whichever node reads them, a folder version's files through the object
store), decoded by the task's `Preprocess` inside Ray Data (`decode_batch`: x float32
(N, C, H, W), y int64). `TorchTrainer(datasets=...)` hands each worker its share of "train"
(`ray.train.get_dataset_shard`) and the whole of "val"; `ShardBatches` is what `ctx.data_loader()`
returns there: the shard's batches, reshuffled every epoch with a seed.

A decoded set that fits a quarter of the cluster's object store is decoded once, on the driver's
call, before training starts: an undecodable image fails the run there (InvalidInput naming its id)
and the epochs re-read decoded blocks instead of decoding again. A bigger one streams, decoded
anew every epoch as workers consume it; an undecodable image then stops the run with the same
error once Ray Train gives up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from flowops.errors import InvalidInput

CACHE_FRACTION = 0.25  # decoded sets up to this share of the object store are decoded once
SHUFFLE_BUFFER_BYTES = 256 * 2**20  # a worker's local shuffle buffer holds at most this much


def decode_batch(batch: dict[str, np.ndarray], preprocess, classes: list[str], tag: str) -> dict:
    """A Ray Data batch of (id, label, split, bytes) as the model's input: x (N, C, H, W) float32,
    y int64 class indices. The same decode as serving and the holdout (`evaluate.decode_image`)."""
    from flowops.evaluate import decode_image

    index = {c: i for i, c in enumerate(classes)}
    ids, labels = batch["id"], batch["label"]
    x = np.empty((len(ids), *preprocess.shape), dtype=np.float32)
    for i, (image_id, payload) in enumerate(zip(ids, batch["bytes"], strict=True)):
        x[i] = decode_image(str(image_id), payload, preprocess, tag)
    return {"x": x, "y": np.array([index[str(label)] for label in labels], dtype=np.int64)}


def training_datasets(settings, version, rows: dict[str, Any], preprocess) -> dict[str, Any]:
    """{name: Ray Dataset of (x, y)} for each non-empty frame of rows (id, label, split), decoded
    inside Ray Data; small enough ones decoded now (see the module's docstring)."""
    import ray

    from flowops import images

    classes = version.classes
    per_image = int(np.prod(preprocess.shape)) * 4 + 8
    budget = CACHE_FRACTION * float(ray.cluster_resources().get("object_store_memory", 0))
    out = {}
    for name, frame in rows.items():
        if frame.empty:
            continue
        unknown = sorted(set(frame["label"]) - set(classes))
        if unknown:
            raise InvalidInput(f"labels {unknown} are not among the data version's classes {classes}")
        ds = images.dataset(settings, version, frame[["id", "label", "split"]])
        # Same rows, same order, epoch after epoch: with one worker a seed gives the same weights.
        ds.context.execution_options.preserve_order = True
        ds = ds.map_batches(decode_batch, batch_format="numpy", fn_kwargs={
            "preprocess": preprocess, "classes": classes, "tag": version.tag})
        if len(frame) * per_image <= budget:
            try:
                ds = ds.materialize()
            except Exception as exc:  # noqa: BLE001 - Ray wraps the UDF's error its own ways
                raise input_error(exc) or exc from None
        out[name] = ds
    return out


def input_error(exc: BaseException) -> InvalidInput | None:
    """The InvalidInput (an undecodable image) behind a Ray Data or Ray Train failure, if any."""
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        err = stack.pop()
        if id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, InvalidInput):
            return InvalidInput(str(err).strip().splitlines()[-1])
        stack += [e for e in (err.__cause__, err.__context__, getattr(err, "cause", None)) if e]
        stack += [e for e in getattr(err, "worker_failures", {}).values() if isinstance(e, BaseException)]
    return None


def shuffle_buffer_rows(preprocess, batch_size: int) -> int:
    """Rows a worker's local shuffle buffer holds: SHUFFLE_BUFFER_BYTES of decoded images (a
    whole small training set: a full shuffle every epoch)."""
    return max(batch_size, SHUFFLE_BUFFER_BYTES // (int(np.prod(preprocess.shape)) * 4))


class ShardBatches:
    """This worker's shard of the training Dataset as (x, y) batches; each pass reshuffles it
    through a local shuffle buffer seeded with `seed()` (the run's seed plus the epoch)."""

    def __init__(self, shard, *, batch_size: int, buffer_rows: int, seed: Callable[[], int], device):
        self.shard, self.batch_size, self.buffer_rows = shard, batch_size, buffer_rows
        self.seed, self.device = seed, device

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        cuda = self.device.type == "cuda"
        for batch in self.shard.iter_torch_batches(
                batch_size=self.batch_size, local_shuffle_buffer_size=self.buffer_rows,
                local_shuffle_seed=self.seed(), device=self.device, pin_memory=cuda,
                prefetch_batches=2 if cuda else 1):
            yield batch["x"], batch["y"]


def count_correct(model, val, to_device, autocast) -> tuple[int, int]:
    """(correct, seen) of `model` over the validation Dataset (every worker sees all of it)."""
    import torch

    correct = seen = 0
    with torch.no_grad(), autocast():
        for batch in val.iter_torch_batches(batch_size=512):
            xb, yb = to_device(batch["x"], batch["y"])
            correct += int((model(xb).argmax(1) == yb).sum())
            seen += len(yb)
    return correct, seen
