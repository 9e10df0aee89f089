"""The label inbox survives a crash right after acknowledging writes, and the latest label wins."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

from flowops import labels
from flowops.settings import get_settings

WRITER = textwrap.dedent("""
    import sys
    from flowops import labels
    from flowops.settings import get_settings
    s = get_settings(home=sys.argv[1])
    i = 0
    while True:  # batches of labels; each is acknowledged on stdout once record_labels returned
        batch = [labels.Label(f"t{i}-{j}", f"img{j}", str((i + j) % 10), source="file")
                 for j in range(20)]
        labels.record_labels(s, batch)
        print(f"ACK {i}", flush=True)
        i += 1
""")


def test_acknowledged_labels_survive_sigkill_mid_stream(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    acked = -1
    try:
        for line in proc.stdout:
            acked = int(line.split()[1])
            if acked >= 5:
                break
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # no chance to flush or close anything
        proc.wait()
    assert acked >= 5
    s = get_settings(home=tmp_path)
    stored = {r["task_id"]: r["label"] for r in labels.new_labels(s)}
    for i in range(acked + 1):
        for j in range(20):
            assert stored[f"t{i}-{j}"] == str((i + j) % 10)
    # the database is still usable after the crash: a new write goes through
    labels.record_labels(s, [labels.Label("after", "img1", "3")])
    assert labels.counts(s)["new"] >= (acked + 1) * 20 + 1


def test_latest_label_per_task_wins_and_a_correction_after_use_is_new_again(tmp_path):
    s = get_settings(home=tmp_path)
    labels.record_labels(s, [labels.Label("task-1", "d00001", "4")])
    labels.record_labels(s, [labels.Label("task-1", "d00001", "9", annotator="bob")])
    rows = labels.new_labels(s)
    assert [(r["task_id"], r["label"], r["annotator"]) for r in rows] == [("task-1", "9", "bob")]
    labels.mark_used(s, ["task-1"], "v2")
    assert labels.counts(s)["new"] == 0
    labels.record_labels(s, [labels.Label("task-1", "d00001", "7")])
    assert [r["label"] for r in labels.new_labels(s)] == ["7"]
