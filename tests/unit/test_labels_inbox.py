"""The label inbox: durable, idempotent per task id."""

from __future__ import annotations

import pytest

from flowops import labels
from flowops.errors import InvalidInput
from flowops.settings import get_settings


def test_latest_label_for_a_task_wins_and_used_labels_leave_the_queue(tmp_path):
    s = get_settings(home=tmp_path)
    labels.record_labels(s, [labels.Label("t1", "img1", "3"), labels.Label("t2", "img2", "4")])
    labels.record_labels(s, [labels.Label("t1", "img1", "8", source="labelstudio")])
    new = {r["task_id"]: r for r in labels.new_labels(s)}
    assert new["t1"]["label"] == "8" and new["t1"]["source"] == "labelstudio"
    assert labels.counts(s)["new"] == 2
    labels.mark_used(s, ["t1"], "v2")
    assert [r["task_id"] for r in labels.new_labels(s)] == ["t2"]
    # a correction after use makes the task new again
    labels.record_labels(s, [labels.Label("t1", "img1", "9")])
    assert labels.counts(s) | {"oldest_new_age_s": None} == {
        "total": 2, "new": 2, "oldest_new_age_s": None
    }


def test_incomplete_label_is_rejected_and_nothing_is_written(tmp_path):
    s = get_settings(home=tmp_path)
    with pytest.raises(InvalidInput, match="task_id, image_id and label"):
        labels.record_labels(s, [labels.Label("t1", "img1", "3"), labels.Label("t2", "", "4")])
    assert labels.counts(s)["total"] == 0
