"""The continuous training loop end to end on the session's real Ray cluster.

One module-scoped production model (trained for real, validated, promoted, served). Then:
labels → the controller (a Ray job) snapshots them → fine-tunes (a Ray job) — the controller is
killed mid-training and restarted, and must adopt the running job — → validates → canary under
real HTTP traffic with feedback → promoted; then a bad model goes through the canary and is rolled
back. Thresholds and steps are small so the whole module takes a few minutes.
"""

from __future__ import annotations

import time

import pytest

from flowops.durable import wait_until
from tests.conftest import run_cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# A wider accuracy margin than the default keeps the promotion within a minute or two of traffic.
LOOP_ARGS = ["--threshold", "20", "--epochs", "3", "--workers", "1", "--steps", "50,100",
             "--accuracy-margin", "0.1", "--no-pseudo-label"]


def _wait(predicate, timeout_s: float, what: str, poll_s: float = 1.0):
    return wait_until(predicate, timeout_s, what=what, interval_s=poll_s, error=AssertionError)


def _finished(settings, rid: str):
    """The rollout's record once it is done, else None."""
    from flowops.loop import RolloutStore

    record = RolloutStore(settings).get(rid)
    return record if record.done else None


def _roll_out(stack, version: str, *gate_args: str):
    """(rollout id, finished record) of `flowops loop canary` for a trained version."""
    from flowops import loop

    proc = run_cli("loop", "canary", "--model-version", version, *gate_args, check=True)
    rid = proc.stdout.split()[2]
    if loop.loop_status(stack)["controller"]["status"] != "RUNNING":
        run_cli("loop", "start", *LOOP_ARGS, check=True)
    return rid, _wait(lambda: _finished(stack, rid), 300, f"rollout {rid} to finish", poll_s=2)


def _train_local(settings, run_name: str, **overrides) -> str:
    from flowops.train import TrainConfig, train

    cfg = TrainConfig(data_version="v1", local=True, run_name=run_name, **overrides)
    return train(settings, cfg).version


@pytest.fixture(scope="module")
def served(stack, dataset):
    """A real production model behind the serving app (two replicas, as the shipped RayService
    has), and traffic with feedback."""
    from flowops import registry, serving
    from flowops.demo import TrafficGenerator

    version = _train_local(stack, "loop-test-v1", epochs=25, lr=0.01)
    registry.validate_version(stack, version, min_accuracy=0.5)
    registry.promote(stack, version)
    serving.deploy(stack, stable=version, num_replicas=2)
    traffic = TrafficGenerator(stack, rate_per_s=30, feedback_share=0.6).start()
    yield {"version": version, "traffic": traffic}
    traffic.stop()
    run_cli("loop", "stop")


def test_labels_add_checks_every_row_and_records_all_or_nothing(stack, dataset, tmp_path):
    from flowops import data, labels

    manifest = data.open_version(stack, dataset).manifest
    pool = manifest[manifest["split"] == "unlabeled"]["id"].tolist()
    holdout = manifest[manifest["split"] == "holdout"]["id"].iloc[0]
    before = labels.counts(stack)["total"]
    bad = tmp_path / "bad.csv"
    bad.write_text(f"task_id,image_id,label\nx1,{pool[0]},3\nx2,{pool[1]},cat\n")
    proc = run_cli("labels", "add", "--file", str(bad))
    assert proc.returncode != 0 and "line 3" in proc.stderr and "'cat'" in proc.stderr
    bad.write_text(f"task_id,image_id,label\nx3,{holdout},3\n")
    proc = run_cli("labels", "add", "--file", str(bad))
    assert proc.returncode != 0 and "holdout" in proc.stderr
    bad.write_text("task,image\n1,2\n")
    proc = run_cli("labels", "add", "--file", str(bad))
    assert proc.returncode != 0 and "task_id" in proc.stderr and "Traceback" not in proc.stderr
    assert labels.counts(stack)["total"] == before  # nothing half-written


def test_promote_branch_survives_a_controller_restart_mid_training(stack, served, tmp_path):
    from flowops import data, events, jobs, labels, loop, registry, serving

    versions_before = [v.id for v in data.list_versions(stack)]
    run_cli("loop", "start", *LOOP_ARGS, check=True)
    # a second controller is refused while one runs
    second = run_cli("loop", "start", *LOOP_ARGS)
    assert second.returncode != 0 and "already running" in second.stderr
    # other tests of the session (labels add, the Label Studio webhook) may have left labels
    pending_before = labels.counts(stack)["new"]
    proc = run_cli("labels", "simulate", "--count", "20", "--json", check=True)
    assert '"recorded": 20' in proc.stdout

    pid = loop.pipeline_id(stack, "r001", "train")

    def training_running():
        run = jobs.load_pipeline(stack, pid)
        return run and run.steps[0].job_id and run.steps[0].status == "RUNNING"

    _wait(training_running, 180, "the fine-tuning job to start")
    # while it waits on the job, the controller's heartbeat stays fresh and names the job
    job_id = jobs.load_pipeline(stack, pid).steps[0].job_id
    _wait(lambda: loop.RolloutStore(stack).heartbeat().job == job_id, 30,
          "a heartbeat naming the training job")
    assert loop.loop_status(stack)["controller"]["heartbeat_age_s"] < 15
    run_cli("loop", "stop", check=True)  # the controller dies mid-pipeline...
    run_cli("loop", "start", *LOOP_ARGS, check=True)  # ...and a new one resumes the rollout

    record = _wait(lambda: _finished(stack, "r001"), 420, "rollout r001 to finish", poll_s=2)
    assert record.status == "promoted", record
    # exactly one training job and one new data version for the snapshot
    train_jobs = [j for j in jobs.list_jobs(stack) if j.metadata.get("pipeline") == pid]
    assert len(train_jobs) == 1
    new_versions = [v for v in data.list_versions(stack) if v.id not in versions_before]
    assert [v.message.split(":")[0] for v in new_versions] == ["loop r001"]
    manifest = data.open_version(stack, record.data_version).manifest
    assert (manifest["label_source"] == "human").sum() == 20 + pending_before
    assert labels.counts(stack)["new"] == 0
    # production moved; serving sends 100% to the new version
    new = record.model_version
    assert registry.production_version(stack) == new
    routing = serving.routing_status(stack)
    assert str(routing["stable"]) == new and not routing.get("canary")
    # the timeline's stages are in order
    rows = {r["rollout"]: r for r in loop.timeline.timeline(stack)}["r001"]
    stages = [s["stage"] for s in rows["stages"]]
    assert stages == ["threshold reached", "data version cut", "training", "validation",
                      "canary analysis", "promoted"]
    ends = [s["end"] for s in rows["stages"]]
    assert ends == sorted(ends)
    report = run_cli("loop", "report", check=True).stdout
    assert "r001" in report and "promoted" in report
    # events are not duplicated by the restart
    keys = [e["key"] for e in events.read_events(stack, "r001")]
    assert len(keys) == len(set(keys))
    # the promotion was shown, not assumed: every required check ended non-inferior
    ticks = [e for e in events.read_events(stack, "r001") if e["event"] == "analysis_tick"]
    assert ticks and ticks[-1]["action"] == "promote"
    assert {c["status"] for c in ticks[-1]["checks"]} == {"non_inferior"}
    html = run_cli("loop", "report", "--html", str(tmp_path / "r001.html"), "--rollout", "r001",
                   check=True)
    assert "r001" in html.stdout and "<svg" in (tmp_path / "r001.html").read_text()
    _all_answered(served["traffic"])


def _all_answered(traffic) -> None:
    """Every user request got a 200 with a prediction (not merely: no 5xx)."""
    summary = traffic.summary()
    assert summary["sent"] > 0 and summary["failed"] == 0, summary
    assert sum(summary["by_version"].values()) >= summary["sent"] - 1, summary  # one in flight


def test_rollback_branch_sends_all_traffic_to_stable_within_seconds(stack, served):
    from flowops import events, registry, serving
    from flowops.tracking import configure_mlflow

    stable = registry.production_version(stack)
    bad = _train_local(stack, "loop-test-bad", epochs=1, lr=0.001)
    rid, record = _roll_out(stack, bad, "--min-accuracy", "0")  # a lowered gate: it reaches canary
    assert record.status == "rolled_back", record
    assert any("accuracy" in r for r in record.reasons)
    routing = serving.routing_status(stack)
    assert str(routing["stable"]) == stable and not routing.get("canary")
    assert registry.production_version(stack) == stable
    tags = configure_mlflow(stack).get_model_version(stack.model_name, bad).tags
    assert tags["rolled_back"] == "true" and "accuracy" in tags["rolled_back_reasons"]
    event = next(e for e in events.read_events(stack, rid) if e["event"] == "rolled_back")
    assert event["rollback_s"] < 5
    # measured by the clients: the last answer of the bad version came within seconds of the
    # decision (the evidence time), whatever the code under test says about itself
    decided = next(e for e in events.read_events(stack, rid) if e["event"] == "analysis_done")["ts"]
    time.sleep(2)  # answers still in flight at the decision arrive now
    assert served["traffic"].last_seen.get(bad, 0) - decided < 5, served["traffic"].summary()
    runs = configure_mlflow(stack).search_runs(
        [configure_mlflow(stack).get_experiment_by_name("rollouts").experiment_id],
        filter_string=f"tags.rollout = '{rid}'")
    assert runs and runs[0].data.tags["decision"] == "rollback"
    artifacts = [a.path for a in configure_mlflow(stack).list_artifacts(runs[0].info.run_id)]
    assert "rollout_report.html" in artifacts
    _all_answered(served["traffic"])


def test_a_model_that_fails_the_gate_is_rejected_before_any_canary(stack, served):
    from flowops import events, registry, serving

    stable = registry.production_version(stack)
    weak = _train_local(stack, "loop-test-weak", epochs=1, lr=0.0005)
    rid, record = _roll_out(stack, weak)  # the normal gate
    assert record.status == "rejected", record
    assert any("accuracy" in r for r in record.reasons)
    names = [e["event"] for e in events.read_events(stack, rid)]
    assert "validation_failed" in names and "canary_started" not in names
    routing = serving.routing_status(stack)
    assert str(routing["stable"]) == stable and not routing.get("canary")
    assert registry.production_version(stack) == stable
    _all_answered(served["traffic"])
