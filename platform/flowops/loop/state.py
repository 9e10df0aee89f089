"""The loop's durable state: its configuration and one typed record per rollout.

Everything lives in `<home>/loop/`: `config.json` (the `LoopConfig` that `flowops loop start`
saved for the controller job) and `state.json` (the rollout records, their order and the
controller's heartbeat). `state.json` changes only inside `RolloutStore.transaction()`: under a
file lock, read, change, written atomically, so a crash leaves the old or the new state and two
writers never lose each other's change. Records are frozen and reject unknown fields; a stage
changes one through `RolloutStore.update`, which validates the result.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from flowops.durable import atomic_write_text, file_lock
from flowops.errors import NotFound, validated, validated_json
from flowops.rollout import AnalysisConfig
from flowops.settings import Settings

# A rollout's stages in the order the controller drives them; `done` ends it.
Stage = Literal["snapshot", "train", "validate", "canary", "analysis", "pseudo_label", "done"]
# `running` until decided; a finished rollout was promoted, rolled back, rejected at the gate, or
# failed (a stage raised).
Status = Literal["running", "promoted", "rolled_back", "rejected", "failed"]


class LoopConfig(BaseModel):
    """How the loop decides to retrain, how it trains, and how it analyses the canary."""

    model_config = ConfigDict(extra="forbid")

    threshold: int = Field(50, ge=1, description="New human labels that trigger a retrain.")
    max_age_s: float | None = Field(None, gt=0, description="Also retrain when the oldest new "
                                    "label waited this long (needs at least min_labels).")
    min_labels: int = Field(10, ge=1, description="Fewest new labels a max-age or drift retrain "
                            "uses: too few to learn from, and the drift waits for more.")
    retrain_on_drift: bool = Field(True, description="Also retrain when the drift monitor flagged "
                                   "live inputs since the last rollout (needs at least min_labels).")
    poll_s: float = Field(2.0, gt=0, le=300, description="Seconds between inbox checks.")
    epochs: int = Field(3, ge=1, le=1000, description="Fine-tuning epochs.")
    workers: int = Field(2, ge=1, le=64, description="Ray Train workers.")
    cpus_per_worker: float = Field(0.5, gt=0, le=64, description="CPUs per worker: fractional, so "
                                   "fine-tuning fits beside the serving replicas on a small node.")
    train_overrides: dict[str, Any] = Field(default_factory=dict, description="Extra TrainConfig "
                                            "fields of the fine-tuning job, e.g. {\"lr\": 0.001}.")
    pseudo_label: bool = Field(True, description="Refresh pseudo-labels after a promotion.")
    pseudo_label_overrides: dict[str, Any] = Field(default_factory=dict, description="Extra "
                                                   "PseudoLabelConfig fields.")
    step_timeout_s: float = Field(1800, gt=0, description="Longest a pipeline job may run.")
    max_rollouts: int | None = Field(None, ge=1, description="Exit after this many rollouts.")
    gate_min_accuracy: float | None = Field(None, ge=0, le=1, description="Registry gate floor "
                                            "(default: the registry's FLOWOPS_GATE_ settings).")
    gate_max_regression: float | None = Field(None, ge=0, le=1, description="Allowed accuracy "
                                              "drop vs production at the gate.")
    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig)


class Gate(BaseModel):
    """A rollout's own registry gate (a hand-submitted candidate may lower it); None = the loop's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_accuracy: float | None = Field(None, ge=0, le=1)
    max_regression: float | None = Field(None, ge=0, le=1)


class Snapshot(BaseModel):
    """The labels a rollout consumes, recorded before the data version is cut."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    labels: dict[str, list[str]]  # task id -> [image id, label]


class AnalysisProgress(BaseModel):
    """Where the canary analysis stands: the weight step and the ledger when that step began."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    step: int = Field(ge=0)
    started: float
    started_requests: int = Field(ge=0)
    ticks: int = Field(0, ge=0)
    began: float | None = Field(None, description="When the analysis began (its deadline counts "
                                "from here; None in records older than sequential analysis).")
    waiting: list[str] = Field(default_factory=list, description="What the last look still needed: "
                               "how much more evidence each check wants.")


class RolloutRecord(BaseModel):
    """One rollout: its stage and everything the stages recorded (what a restart resumes from)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    stage: Stage
    status: Status | None = None
    created: float | None = None
    updated: float | None = None
    reason: str | None = None
    reasons: list[str] = Field(default_factory=list)
    snapshot: Snapshot | None = None
    data_version: str | None = None
    base_version: str | None = None  # production when training started (fine-tuned from it)
    model_version: str | None = None
    gate: Gate = Field(default_factory=Gate)
    stable_version: str | None = None
    run_id: str | None = None  # the MLflow run of the canary analysis
    analysis: AnalysisProgress | None = None
    deciding: Literal["promote", "rollback"] | None = None  # decided, not yet finished
    rollback_s: float | None = None

    @property
    def done(self) -> bool:
        return self.stage == "done"


class Heartbeat(BaseModel):
    """What the controller last said it was doing (`flowops loop status`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    status: Literal["running", "stopped"] | None = None
    heartbeat: float | None = None
    pid: int | None = None
    started: float | None = None
    stopped: float | None = None
    config: dict[str, Any] | None = None  # the LoopConfig it runs with, for the reader
    rollout: str | None = None
    stage: str | None = None  # a rollout stage, or the pipeline it waits on
    job: str | None = None


class LoopState(BaseModel):
    """The content of `state.json`."""

    model_config = ConfigDict(extra="forbid")

    rollouts: dict[str, RolloutRecord] = Field(default_factory=dict)
    order: list[str] = Field(default_factory=list)
    controller: Heartbeat = Field(default_factory=Heartbeat)


def loop_dir(settings: Settings) -> Path:
    return settings.home / "loop"


def home_tag(settings: Settings) -> str:
    """A short id of the home folder: job and pipeline ids of two homes never collide."""
    return hashlib.sha1(str(settings.home).encode()).hexdigest()[:6]


def save_config(settings: Settings, config: LoopConfig) -> None:
    loop_dir(settings).mkdir(parents=True, exist_ok=True)
    atomic_write_text(loop_dir(settings) / "config.json", config.model_dump_json(indent=2))


def load_config(settings: Settings) -> LoopConfig:
    path = loop_dir(settings) / "config.json"
    if not path.exists():
        return LoopConfig()
    return validated_json(LoopConfig, path.read_text(), str(path))


def parse_config(raw: dict[str, Any]) -> LoopConfig:
    """A LoopConfig from CLI values (None = the default); one clear line when one is out of range."""
    return validated(LoopConfig, "invalid loop setting", **{k: v for k, v in raw.items()
                                                             if v is not None})


class RolloutStore:
    """The one reader and writer of `state.json`."""

    def __init__(self, settings: Settings):
        self.dir = loop_dir(settings)
        self.path = self.dir / "state.json"

    def read(self) -> LoopState:
        if not self.path.exists():
            return LoopState()
        return validated_json(LoopState, self.path.read_text(), str(self.path))

    @contextlib.contextmanager
    def transaction(self) -> Iterator[LoopState]:
        """The state to change in place; written (atomically) when the block ends without error."""
        with file_lock(self.dir / "state.lock"):
            state = self.read()
            yield state
            atomic_write_text(self.path, state.model_dump_json(indent=2, exclude_none=True))

    def get(self, rid: str) -> RolloutRecord:
        record = self.read().rollouts.get(rid)
        if record is None:
            raise NotFound(f"no rollout {rid!r} in {self.path}")
        return record

    def records(self) -> list[RolloutRecord]:
        """Every rollout, oldest first."""
        state = self.read()
        return [state.rollouts[rid] for rid in state.order]

    def update(self, rid: str, **changes: Any) -> RolloutRecord:
        """Create or change one rollout's record durably; returns the new record."""
        with self.transaction() as state:
            old = state.rollouts.get(rid)
            base = old.model_dump(exclude_none=True) if old else {"id": rid}
            record = RolloutRecord.model_validate({**base, **changes, "updated": time.time()})
            state.rollouts[rid] = record
            if rid not in state.order:
                state.order.append(rid)
        return record

    def beat(self, **fields: Any) -> None:
        """Record the controller's heartbeat (with what it is doing now)."""
        with self.transaction() as state:
            state.controller = Heartbeat.model_validate(
                {**state.controller.model_dump(exclude_none=True), **fields,
                 "heartbeat": time.time()})

    def heartbeat(self) -> Heartbeat:
        return self.read().controller

    def unfinished(self) -> str | None:
        """The rollout a (restarted) controller must finish before it starts another."""
        return next((r.id for r in self.records() if not r.done), None)

    def next_id(self) -> str:
        return f"r{len(self.read().order) + 1:03d}"

    def last_created(self) -> float:
        """When the newest rollout began (0 when there is none)."""
        return max((r.created or 0 for r in self.read().rollouts.values()), default=0)
