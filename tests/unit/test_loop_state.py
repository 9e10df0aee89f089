"""The loop's state: typed records behind one store in the state database (no cluster)."""

from __future__ import annotations

import json

import pytest

from flowops import statedb
from flowops.errors import InvalidInput, NotFound
from flowops.loop import LoopConfig, RolloutStore, parse_config
from flowops.loop.state import load_config, save_config
from flowops.settings import get_settings

# A state file as the controller wrote it before records were typed (plain dicts), and before the
# state database: imported when the home's database is first migrated.
OLD_STATE = {
    "rollouts": {
        "r001": {"id": "r001", "stage": "done", "status": "promoted", "created": 1.0,
                 "reason": "20 new labels >= threshold 20",
                 "snapshot": {"labels": {"t1": ["img1", "3"]}}, "updated": 9.0,
                 "data_version": "v2", "base_version": None, "model_version": "2",
                 "stable_version": "1", "run_id": "abc",
                 "analysis": {"step": 1, "started": 5.0, "started_requests": 30, "ticks": 7},
                 "deciding": "promote", "reasons": ["all checks passed"]},
        "r002": {"id": "r002", "stage": "analysis", "status": "running", "created": 10.0,
                 "model_version": "3", "gate": {"min_accuracy": 0.0, "max_regression": 1.0},
                 "reason": "candidate submitted by hand", "updated": 11.0,
                 "stable_version": "2", "run_id": "def",
                 "analysis": {"step": 0, "started": 11.0, "started_requests": 0}},
    },
    "order": ["r001", "r002"],
    "controller": {"status": "running", "pid": 42, "started": 1.0, "config": {"threshold": 20},
                   "heartbeat": 12.0, "rollout": "r002", "stage": "retrain", "job": None},
}


def test_a_state_file_of_the_untyped_controller_still_loads_and_resumes(tmp_path):
    s = get_settings(home=tmp_path)
    store = RolloutStore(s)
    (tmp_path / "loop").mkdir()
    (tmp_path / "loop" / "state.json").write_text(json.dumps(OLD_STATE))
    assert store.unfinished() == "r002"
    record = store.get("r002")
    assert record.gate.min_accuracy == 0.0 and record.analysis.ticks == 0
    assert store.get("r001").snapshot.labels == {"t1": ["img1", "3"]}
    assert store.heartbeat().stage == "retrain" and store.next_id() == "r003"
    assert store.last_created() == 10.0


def test_updates_are_validated_and_a_failed_transaction_writes_nothing(tmp_path):
    s = get_settings(home=tmp_path)
    store = RolloutStore(s)
    with pytest.raises(NotFound):
        store.get("r001")
    first = store.update("r001", stage="snapshot", status="running", created=1.0)
    assert store.update("r001", stage="train").created == 1.0  # other fields kept
    with pytest.raises(ValueError, match="stage"):
        store.update("r001", stage="trian")
    with pytest.raises(ValueError, match="extra"):
        store.update("r001", colour="red")
    with pytest.raises(RuntimeError), store.transaction() as state:
        state.order.append("r999")
        raise RuntimeError("crash inside the transaction")
    assert store.read().order == ["r001"] and store.get("r001").stage == "train"
    assert first.stage == "snapshot"  # a record is a value: the store returns a new one

    store.beat(status="running", rollout="r001", job="j1")
    store.beat(status="running", job=None)
    beat = store.heartbeat()
    assert beat.rollout == "r001" and beat.job is None and beat.heartbeat


def test_a_corrupt_record_is_one_clear_error(tmp_path):
    s = get_settings(home=tmp_path)
    store = RolloutStore(s)
    (tmp_path / "loop").mkdir()
    (tmp_path / "loop" / "state.json").write_text(json.dumps(
        {"rollouts": {"r001": {"id": "r001", "stage": "later"}}, "order": ["r001"]}))
    with pytest.raises(InvalidInput, match=r"loop state in the state database: rollouts\.r001\.stage"):
        store.records()


def test_config_round_trip_and_one_line_errors(tmp_path):
    s = get_settings(home=tmp_path)
    assert load_config(s) == LoopConfig()
    config = parse_config({"threshold": 7, "max_age_s": None, "analysis": {"steps": [50, 100]}})
    save_config(s, config)
    assert load_config(s) == config and load_config(s).max_age_s is None
    with pytest.raises(InvalidInput, match="invalid loop setting: analysis.steps"):
        parse_config({"analysis": {"steps": [50, 60]}})
    with statedb.transaction(s) as conn:
        statedb.put_document(conn, "loop.config", {"threshold": 0})
    with pytest.raises(InvalidInput, match="saved loop config: threshold"):
        load_config(s)


def test_the_loop_places_its_training_workers_as_training_does():
    """`loop start --placement-strategy STRICT_SPREAD` is checked when the loop starts, with the
    choices of TrainConfig (which the fine-tuning job is given)."""
    from typing import get_args

    from flowops.train import TrainConfig

    assert parse_config({"placement_strategy": "STRICT_SPREAD"}).placement_strategy == "STRICT_SPREAD"
    assert LoopConfig().placement_strategy == TrainConfig().placement_strategy == "PACK"
    assert get_args(LoopConfig.model_fields["placement_strategy"].annotation) == \
        get_args(TrainConfig.model_fields["placement_strategy"].annotation)
    with pytest.raises(InvalidInput, match="invalid loop setting: placement_strategy"):
        parse_config({"placement_strategy": "EVERYWHERE"})


def test_the_controller_is_named_after_the_shared_state_not_the_home(state_backend, tmp_path):
    """A driver elsewhere (its own home) that shares the state database finds the same controller
    job and the loop's pipelines; a platform with another database has another name."""
    from flowops.loop import controller_submission_id, platform_tag

    url = statedb.state_url(state_backend)
    here = controller_submission_id(state_backend)
    elsewhere = get_settings(home=tmp_path / "elsewhere", state_url=url)
    assert controller_submission_id(elsewhere) == here == f"flowops-loop-{platform_tag(elsewhere)}"
    other = get_settings(home=tmp_path / "other", state_url=f"sqlite:///{tmp_path}/other.db")
    assert controller_submission_id(other) != here
