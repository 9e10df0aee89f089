"""The state database behind the stores, on SQLite and on a real PostgreSQL server: concurrent
writers in several processes, exactly-once snapshots and events, records that a restarted
process finds, ledger totals that outlive their actor, and bad URLs / failed migrations."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from flowops import events, jobs, labels, statedb
from flowops.errors import ClusterUnavailable, FlowOpsError
from flowops.loop import RolloutStore
from flowops.settings import get_settings
from tests.conftest import REPO, run_cli


def _spawn(code: str, *args: str) -> subprocess.Popen:
    """A Python process with this test's environment (FLOWOPS_HOME, FLOWOPS_STATE_URL)."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


LABEL_WRITER = """
    import sys
    from flowops import labels
    from flowops.settings import get_settings
    s, w = get_settings(), sys.argv[1]
    i = 0
    while True:  # a batch is acknowledged on stdout once record_labels returned
        labels.record_labels(s, [labels.Label(f"{w}-{i}-{j}", f"img{j}", str(j % 10), source="file")
                                 for j in range(10)])
        print(f"ACK {i}", flush=True)
        i += 1
"""


def test_acknowledged_labels_survive_concurrent_writers_killed_mid_stream(state_backend):
    """Four writer processes at once (as four replicas taking webhooks would), each killed with
    SIGKILL after acknowledging batches: every acknowledged label is in the inbox."""
    writers = {f"w{k}": _spawn(LABEL_WRITER, f"w{k}") for k in range(4)}
    acked = {}
    try:
        for name, proc in writers.items():
            for line in proc.stdout:
                acked[name] = int(line.split()[1])
                if acked[name] >= 8:
                    break
    finally:
        for proc in writers.values():
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    assert all(n >= 8 for n in acked.values()), {n: p.stderr.read()[-500:] for n, p in writers.items()}
    stored = {r["task_id"]: r["label"] for r in labels.new_labels(state_backend)}
    for name, last in acked.items():
        for i in range(last + 1):
            for j in range(10):
                assert stored[f"{name}-{i}-{j}"] == str(j % 10)
    labels.record_labels(state_backend, [labels.Label("after", "img1", "3")])  # still usable
    assert labels.counts(state_backend)["total"] == len(stored) + 1


def test_latest_label_wins_and_mark_used_consumes_once(state_backend):
    s = state_backend
    labels.record_labels(s, [labels.Label("t1", "img1", "3"), labels.Label("t2", "img2", "4")])
    labels.record_labels(s, [labels.Label("t1", "img1", "8", source="labelstudio")])
    assert {r["task_id"]: r["label"] for r in labels.new_labels(s)} == {"t1": "8", "t2": "4"}
    labels.mark_used(s, ["t1", "t2"], "v2")
    labels.mark_used(s, ["t1"], "v3")  # already consumed: stays in v2
    with statedb.reading(s) as conn:
        used = dict(conn.execute(statedb.labels.select().with_only_columns(
            statedb.labels.c.task_id, statedb.labels.c.used_in)).all())
    assert used == {"t1": "v2", "t2": "v2"}
    assert labels.counts(s)["new"] == 0


SNAPSHOT_CUTTER = """
    import json
    from flowops import loop
    from flowops.settings import get_settings
    record = loop.snapshot_labels(get_settings(), "r001", "race")
    print(json.dumps({"data_version": record.data_version, "stage": record.stage}))
"""


@pytest.mark.slow
def test_a_snapshot_is_cut_exactly_once_under_concurrent_cutters(state_backend):
    """Three processes snapshot the same rollout at once: one data version is cut, every cutter
    reports it, the labels are consumed once and each event is written once."""
    from flowops import data

    s = state_backend
    data.init_dataset(s)
    manifest = data.open_version(s).manifest
    pool = manifest[manifest["split"] == "unlabeled"]["id"].tolist()[:5]
    labels.record_labels(s, [labels.Label(f"t-{i}", i, "3") for i in pool])
    before = [v.id for v in data.list_versions(s)]
    cutters = [_spawn(SNAPSHOT_CUTTER) for _ in range(3)]
    outputs = [p.communicate(timeout=300) for p in cutters]
    assert all(p.returncode == 0 for p in cutters), [err[-800:] for _, err in outputs]
    after = [v.id for v in data.list_versions(s)]
    assert len(after) == len(before) + 1
    reported = {json.loads(out.strip().splitlines()[-1])["data_version"] for out, _ in outputs}
    assert reported == {after[-1]}
    assert labels.counts(s)["new"] == 0
    names = [e["event"] for e in events.read_events(s, "r001")]
    assert names == ["retrain_triggered", "data_version_cut"]
    assert RolloutStore(s).get("r001").stage == "train"


ROLLOUT_WRITER = """
    import sys
    from flowops.loop import RolloutStore
    from flowops.settings import get_settings
    store, w = RolloutStore(get_settings()), sys.argv[1]
    for i in range(15):
        store.update(f"{w}-{i}", stage="snapshot", status="running", created=float(i))
        store.update(f"{w}-{i}", stage="train")
        store.beat(status="running", rollout=f"{w}-{i}")
"""

ADOPTER = """
    import json
    from flowops import jobs
    from flowops.loop import RolloutStore
    from flowops.settings import get_settings
    s = get_settings()
    rid = RolloutStore(s).unfinished()
    run = jobs.load_pipeline(s, f"loop-x-{rid}-train")
    print(json.dumps({"rollout": rid, "job": run.steps[0].job_id, "status": run.steps[0].status}))
"""


def test_rollout_records_from_concurrent_processes_and_a_restarted_controller_adopts(state_backend):
    s = state_backend
    writers = [_spawn(ROLLOUT_WRITER, f"w{k}") for k in range(3)]
    for proc in writers:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-800:]
    records = RolloutStore(s).records()
    assert len(records) == 45 and all(r.stage == "train" and r.created is not None for r in records)
    assert len({r.id for r in records}) == 45 and RolloutStore(s).heartbeat().status == "running"

    # A controller records its rollout and the pipeline step it submitted, then dies; a new
    # process (the restarted controller, possibly on another node) finds both.
    for r in records:
        RolloutStore(s).update(r.id, stage="done", status="promoted")
    RolloutStore(s).update("r046", stage="train", status="running", data_version="v2")
    step = jobs.Step("train", "train", '{"epochs": 1}', status="RUNNING", job_id="loop-x-r046-train--0")
    jobs.save_pipeline(s, jobs.PipelineRun(id="loop-x-r046-train", name="train", steps=[step],
                                           status="RUNNING"))
    proc = _spawn(ADOPTER)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-800:]
    assert json.loads(out) == {"rollout": "r046", "job": "loop-x-r046-train--0", "status": "RUNNING"}
    assert [p.id for p in jobs.list_pipelines(s)] == ["loop-x-r046-train"]


EMITTER = """
    from flowops import events
    from flowops.settings import get_settings
    s = get_settings()
    for i in range(20):
        events.emit(s, "analysis_tick", rollout="r001", key=f"r001:tick:{i}", step=i)
"""


def test_each_keyed_event_is_written_once_by_concurrent_writers(state_backend):
    s = state_backend
    writers = [_spawn(EMITTER) for _ in range(3)]
    for proc in writers:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-800:]
    ticks = events.read_events(s, "r001")
    assert sorted(e["step"] for e in ticks) == list(range(20))
    first = events.emit(s, "promoted", rollout="r002", version="3")
    again = events.emit(s, "promoted", rollout="r002", version="4")
    assert again["version"] == "3" and again["ts"] == first["ts"]
    events.emit(s, "drift_detected", version="5")  # no rollout, no key: always appended
    events.emit(s, "drift_detected", version="5")
    assert [e["event"] for e in events.read_events(s)][-3:] == ["promoted", "drift_detected",
                                                               "drift_detected"]


def test_ledger_totals_survive_a_restarted_state_actor(state_backend):
    """The routing actor's class, run without Ray (Ray restarts an actor by calling __init__
    again with the same arguments): counts flushed and feedback given before survive."""
    from flowops.serving.state import ServingState

    actor_class = ServingState.__ray_metadata__.modified_class
    config = state_backend.model_dump_json()

    async def traffic():
        first = actor_class("classifier", config)
        await first.flush({"1": {"requests": 5, "errors": 1, "latencies_ms": [3.0, 40.0]},
                           "2": {"requests": 2, "shadow_agree": 1, "shadow_total": 2}},
                          [("req-a", "2", "7")])
        await first.feedback("req-a", "7")
        return await first.snapshot()

    before = asyncio.run(traffic())
    restarted = actor_class("classifier", config)
    after = asyncio.run(restarted.snapshot())
    for version in ("1", "2"):
        for key in ("requests", "errors", "feedback_correct", "feedback_total", "shadow_agree",
                    "shadow_total", "latency_hist", "latency_sum_ms"):
            assert after["versions"][version][key] == before["versions"][version][key], key
    assert after["versions"]["2"]["feedback_correct"] == 1 and after["since"] == before["since"]
    assert asyncio.run(actor_class("another-app", config).snapshot())["versions"] == {}


def test_old_home_files_are_imported_once_on_first_migration(tmp_path):
    (tmp_path / "labels").mkdir()
    old = sqlite3.connect(tmp_path / "labels" / "inbox.sqlite")
    old.execute("CREATE TABLE labels (task_id TEXT PRIMARY KEY, image_id TEXT, label TEXT, "
                "source TEXT, annotator TEXT, received_at REAL, used_in TEXT)")
    old.execute("INSERT INTO labels VALUES ('t1', 'img1', '3', 'file', 'ann', 1.0, NULL), "
                "('t2', 'img2', '4', 'api', '', 2.0, 'v2')")
    old.commit()
    old.close()
    (tmp_path / "loop").mkdir()
    (tmp_path / "loop" / "events.jsonl").write_text(
        '{"ts": 1, "event": "promoted", "rollout": "r001", "key": "r001:promoted"}\n'
        '{"ts": 2, "event": "promoted", "rollout": "r001", "key": "r001:promoted"}\n{"torn": ')
    (tmp_path / "pipelines").mkdir()
    run = jobs.PipelineRun(id="p1", name="p", steps=[jobs.Step("train", "train")], created=5.0)
    (tmp_path / "pipelines" / "p1.json").write_text(json.dumps(run.to_dict()))
    s = get_settings(home=tmp_path)
    assert labels.counts(s)["total"] == 2 and [r["task_id"] for r in labels.new_labels(s)] == ["t1"]
    assert [e["ts"] for e in events.read_events(s)] == [1]
    assert jobs.load_pipeline(s, "p1").steps[0].name == "train"
    assert statedb.migrate(s)["before"] == statedb.migrate(s)["revision"]  # idempotent


# Bad input and faults ---------------------------------------------------------------------------


def test_an_unparsable_or_unreachable_state_url_is_one_line_with_the_password_masked(tmp_path):
    env = {"FLOWOPS_HOME": str(tmp_path / "home")}
    bad = run_cli("loop", "report", env={**env, "FLOWOPS_STATE_URL": "not a url:secret@"})
    assert bad.returncode == 5, bad.stderr
    assert "not a database URL" in bad.stderr and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1

    url = "postgresql://flowops:s3cret@127.0.0.1:1/flowops"  # nothing listens on port 1
    down = run_cli("loop", "report", env={**env, "FLOWOPS_STATE_URL": url})
    assert down.returncode == 5, down.stderr
    line = down.stderr.strip()
    assert "s3cret" not in line and "flowops:***@127.0.0.1:1/flowops" in line
    assert "connecting to 127.0.0.1:1 as flowops" in line and len(line.splitlines()) == 1

    up = run_cli("up", env={**env, "FLOWOPS_STATE_URL": url})
    assert up.returncode == 5 and "s3cret" not in up.stderr + up.stdout
    assert not (tmp_path / "home" / "state.json").exists()  # nothing started, nothing recorded

    unsupported = get_settings(home=tmp_path, state_url="mysql://u:pw@host/db")
    with pytest.raises(ClusterUnavailable, match=r"mysql://u:\*\*\*@host/db: backend 'mysql'"):
        labels.counts(unsupported)


def test_a_failed_migration_leaves_the_previous_schema_usable(state_backend, tmp_path, monkeypatch):
    s = state_backend
    labels.record_labels(s, [labels.Label("t1", "img1", "3")])
    broken = tmp_path / "migrations"
    shutil.copytree(statedb.MIGRATIONS, broken)
    (broken / "versions" / "0099_broken.py").write_text(textwrap.dedent('''
        import sqlalchemy as sa
        from alembic import op

        revision = "0099"
        down_revision = "0002"

        def upgrade():
            op.create_table("half_done", sa.Column("id", sa.Integer, primary_key=True))
            op.add_column("labels", sa.Column("extra", sa.String))
            op.execute("UPDATE labels SET label = 'overwritten'")
            raise RuntimeError("the migration broke half way")
    '''))
    monkeypatch.setattr(statedb, "MIGRATIONS", broken)
    with pytest.raises(FlowOpsError, match="from 0002 to 0099 failed, nothing was changed"):
        statedb.migrate(s)
    monkeypatch.undo()
    import sqlalchemy as sa

    with statedb.reading(s) as conn:
        inspector = sa.inspect(conn)
        assert "half_done" not in inspector.get_table_names()
        assert "extra" not in {c["name"] for c in inspector.get_columns("labels")}
        assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar() == "0002"
    assert [r["label"] for r in labels.new_labels(s)] == ["3"]
    labels.record_labels(s, [labels.Label("t2", "img2", "4")])
    assert labels.counts(s)["total"] == 2


def test_relative_sqlite_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = get_settings(home=tmp_path, state_url="sqlite:///state/here.db")
    assert s.state_url == f"sqlite:///{tmp_path}/state/here.db"
    assert s.job_env()["FLOWOPS_STATE_URL"] == s.state_url
    labels.record_labels(s, [labels.Label("t1", "img1", "3")])
    assert (tmp_path / "state" / "here.db").exists()


def test_a_restarted_state_actor_adopts_the_routing_its_replicas_serve(tmp_path):
    """The routing is not in the database: after a restart the first replica's routing and epoch
    come back (that replica is then up to date); a later replica's cannot overwrite it."""
    from flowops.serving.state import ServingState
    from flowops.settings import get_settings

    actor_class = ServingState.__ray_metadata__.modified_class
    config = get_settings(home=tmp_path).model_dump_json()
    routing = {"stable": "1", "canary": "2", "weight": 40}

    async def restart():
        restarted = actor_class("classifier", config)
        assert (await restarted.wait_change(7, 0.1)) == (0, None)
        adopted = await restarted.adopt_routing(routing, "hash", 7)
        again = await restarted.adopt_routing({"stable": "9"}, "hash", 3)
        return adopted, again, await restarted.status()

    adopted, again, status = asyncio.run(restart())
    assert adopted == again == (7, routing)
    assert (status["epoch"], status["routing"], status["deployment_hash"]) == (7, routing, "hash")
