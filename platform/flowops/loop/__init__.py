"""The continuous training loop: labels accumulate → retrain → validate → canary → promote or
roll back → pseudo-label, driven by a controller (a long-lived Ray job), exactly once across
restarts.

    state       LoopConfig, the typed RolloutRecord and RolloutStore (in the state database)
    stages      one rollout, stage by stage
    controller  when to retrain; run, start, stop and report the controller
    timeline    the per-rollout report of the event log (`flowops loop report`)
"""

from flowops.loop import timeline
from flowops.loop.controller import (
    controller_submission_id,
    loop_status,
    run_controller,
    should_retrain,
    start_controller,
    stop_controller,
    submit_candidate,
)
from flowops.loop.stages import drive_rollout, pipeline_id, snapshot_labels
from flowops.loop.state import (
    LoopConfig,
    RolloutRecord,
    RolloutStore,
    load_config,
    parse_config,
    platform_tag,
    save_config,
)

__all__ = [
    "LoopConfig", "RolloutRecord", "RolloutStore", "controller_submission_id", "drive_rollout",
    "load_config", "loop_status", "parse_config", "pipeline_id", "platform_tag", "run_controller",
    "save_config", "should_retrain", "snapshot_labels", "start_controller", "stop_controller",
    "submit_candidate", "timeline",
]
