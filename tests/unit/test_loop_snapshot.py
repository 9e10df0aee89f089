"""Label snapshots are cut exactly once, even when the controller dies between the steps.

Uses a real git + DVC data workspace (no Ray): the default dataset, labels in the real inbox.
"""

from __future__ import annotations

import pytest

from flowops import data, events, labels, loop
from flowops.loop import stages
from flowops.settings import get_settings


class Crash(BaseException):
    """Stands for the process dying (not an error the code could handle)."""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    s = get_settings(home=tmp_path_factory.mktemp("loop-snap"))
    data.init_dataset(s)
    return s


def _pool(s, n):
    manifest = data.open_version(s).manifest
    root = data.materialize(s, None)
    import pandas as pd

    answers = pd.read_csv(root / "answers.csv", dtype=str).set_index("id")["label"]
    ids = manifest[manifest["split"] == "unlabeled"]["id"].tolist()[:n]
    return [(i, answers[i]) for i in ids]


def test_crash_after_the_cut_before_mark_used_does_not_cut_twice(workspace, monkeypatch):
    s = workspace
    items = _pool(s, 6)
    labels.record_labels(s, [labels.Label(f"t-{i}", i, lab, source="file") for i, lab in items])
    config = loop.LoopConfig(threshold=5)
    assert loop.should_retrain(s, config)
    before = [v.id for v in data.list_versions(s)]

    def die(*args, **kwargs):
        raise Crash()

    monkeypatch.setattr(labels, "mark_used", die)
    with pytest.raises(Crash):
        loop.snapshot_labels(s, "r001", "test")
    monkeypatch.undo()
    after_crash = [v.id for v in data.list_versions(s)]
    assert len(after_crash) == len(before) + 1  # the version was cut, the labels not yet marked
    assert labels.counts(s)["new"] == 6

    # a restarted controller resumes the recorded rollout at its snapshot stage
    assert loop.RolloutStore(s).unfinished() == "r001"
    record = stages.stage_snapshot(s, config, "r001")
    assert record.stage == "train" and record.data_version == after_crash[-1]
    assert [v.id for v in data.list_versions(s)] == after_crash  # no second cut
    assert labels.counts(s)["new"] == 0
    manifest = data.open_version(s, record.data_version).manifest
    moved = manifest.set_index("id").loc[[i for i, _ in items]]
    assert set(moved["split"]) == {"train"} and set(moved["label_source"]) == {"human"}
    assert list(moved["label"]) == [lab for _, lab in items]
    root = data.materialize(s, record.data_version)
    assert all((root / p).exists() for p in moved["path"])
    answers = (root / "answers.csv").read_text()
    assert not any(i in answers for i, _ in items)
    names = [e["event"] for e in events.read_events(s, "r001")]
    assert names == ["retrain_triggered", "data_version_cut"]


def test_below_threshold_nothing_happens_and_max_age_triggers(workspace):
    s = workspace
    items = _pool(s, 2)
    labels.record_labels(s, [labels.Label(f"a-{i}", i, lab) for i, lab in items])
    assert loop.should_retrain(s, loop.LoopConfig(threshold=50)) is None
    reason = loop.should_retrain(s, loop.LoopConfig(threshold=50, max_age_s=1e-6, min_labels=2))
    assert reason and "waited" in reason


def test_drift_since_the_last_rollout_triggers_a_retrain_once_labels_exist(tmp_path):
    """The drift monitor's `drift_detected` event is a retrain trigger (with at least min_labels
    new labels to learn from); a rollout that began after it answers it."""
    import time

    s = get_settings(home=tmp_path)
    config = loop.LoopConfig(threshold=50, min_labels=2)
    events.emit(s, "drift_detected", version="3", score=0.9, model=s.model_name)
    assert loop.should_retrain(s, config) is None  # drift, but nothing new to learn from
    labels.record_labels(s, [labels.Label("t-1", "img-1", "4")])
    assert loop.should_retrain(s, config) is None  # one label is fewer than min_labels
    labels.record_labels(s, [labels.Label("t-2", "img-2", "5")])
    events.emit(s, "drift_detected", version="9", score=0.9, model="another-model")  # not ours
    reason = loop.should_retrain(s, config)
    assert reason and "drift detected" in reason and "v3" in reason
    assert loop.should_retrain(s, loop.LoopConfig(threshold=50, min_labels=2,
                                                  retrain_on_drift=False)) is None

    loop.RolloutStore(s).update("r0001", created=time.time() + 1e-3, stage="snapshot")
    time.sleep(0.01)
    assert loop.should_retrain(s, config) is None  # that rollout answers the drift before it
    events.emit(s, "drift_detected", version="4", score=0.7, model=s.model_name)
    assert "v4" in (loop.should_retrain(s, config) or "")


def test_labels_from_a_csv_are_all_or_nothing_and_simulated_labelers_skip_pending(workspace,
                                                                                 tmp_path):
    from flowops import queue
    from flowops.errors import InvalidInput

    s = workspace
    manifest = data.open_version(s).manifest
    pool = [i for i in manifest[manifest["split"] == "unlabeled"]["id"]
            if i not in {r["image_id"] for r in labels.new_labels(s)}]
    holdout = manifest[manifest["split"] == "holdout"]["id"].iloc[0]
    before = labels.counts(s)["total"]
    csv = tmp_path / "labels.csv"
    csv.write_text(f"task_id,image_id,label\nc1,{pool[0]},3\nc2,{holdout},4\n")
    with pytest.raises(InvalidInput, match="line 3.*holdout"):
        labels.add_labels_from_file(s, csv)
    assert labels.counts(s)["total"] == before
    csv.write_text(f"task_id,image_id,label\nc1,{pool[0]},3\n")
    assert labels.add_labels_from_file(s, csv, annotator="ann") == 1

    # asked for the whole pool, they label every unlabeled image not already waiting in the inbox
    result = queue.simulate_labels(s, len(pool))
    assert result["from"].startswith("unlabeled pool")  # no pseudo-label run: no review queue
    simulated = {r["image_id"] for r in labels.new_labels(s) if r["source"] == "simulated"}
    assert result["recorded"] == len(pool) - 1 and simulated == set(pool[1:])


def test_a_snapshot_of_a_sharded_version_rewrites_only_its_manifest(tmp_path):
    """The loop's snapshot on a sharded version: the labels land in the manifest; the storage
    (shards and their index) is exactly as before, byte for byte."""
    from flowops import shard_import, shards, storage

    s = get_settings(home=tmp_path / "home")
    data.init_dataset(s)
    sharded = shard_import.migrate_version(s, "v1", images_per_shard=200).version
    store = storage.open_storage(s)
    before = {rel: store.read_bytes(rel) for rel in store.list("")}
    assert any(rel.endswith(".parquet") for rel in before)
    items = _pool(s, 6)
    labels.record_labels(s, [labels.Label(f"s-{i}", i, lab, source="file") for i, lab in items])
    record = loop.snapshot_labels(s, "r100", "test")
    assert record.stage == "train" and record.data_version == data.latest_version(s) != sharded
    assert {rel: store.read_bytes(rel) for rel in store.list("")} == before  # no shard touched
    cut = shards.open_manifest(s, record.data_version)
    moved = cut.manifest.set_index("id").loc[[i for i, _ in items]]
    assert set(moved["split"]) == {"train"} and set(moved["label_source"]) == {"human"}
    assert list(moved["label"]) == [lab for _, lab in items]
    assert (moved["path"] == "").all() and (moved["shard"] != "").all()
    unchanged = cut.manifest[~cut.manifest["id"].isin([i for i, _ in items])].reset_index(drop=True)
    old = shards.open_manifest(s, sharded).manifest
    assert unchanged.equals(old[~old["id"].isin([i for i, _ in items])].reset_index(drop=True))
    assert labels.counts(s)["new"] == 0
    assert not any(i in (cut.root / "answers.csv").read_text() for i, _ in items)
