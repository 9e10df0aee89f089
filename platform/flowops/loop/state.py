"""The loop's durable state: its configuration and one typed record per rollout.

Everything lives in the state database (`flowops.statedb`), so a controller restarted on another
node resumes where it stopped: the `LoopConfig` that `flowops loop start` saved for the
controller job and the controller's heartbeat (table `documents`), and the rollout records in
their order (table `rollouts`). They change only inside `RolloutStore.transaction()`: one database
transaction under a lock, read, change, written, so a crash leaves the old or the new state and
two writers on any nodes never lose each other's change. Records are frozen and reject unknown
fields; a stage changes one through `RolloutStore.update`, which validates the result.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from flowops.errors import NotFound, validated
from flowops.rollout import AnalysisConfig
from flowops.settings import Settings

CONFIG_DOCUMENT = "loop.config"
CONTROLLER_DOCUMENT = "loop.controller"
PLATFORM_DOCUMENT = "platform.tag"
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
    # TrainConfig's choices (a unit test keeps them equal): checked when the loop starts, not when
    # its first rollout trains.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How Ray places the workers: STRICT_SPREAD puts each on its own node.")
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
    """Every rollout record, their order, and the controller's heartbeat."""

    model_config = ConfigDict(extra="forbid")

    rollouts: dict[str, RolloutRecord] = Field(default_factory=dict)
    order: list[str] = Field(default_factory=list)
    controller: Heartbeat = Field(default_factory=Heartbeat)


def platform_tag(settings: Settings) -> str:
    """A short id of the platform, kept in its state database: every machine that shares the state
    (a driver elsewhere, the controller's job) names the controller job and the loop's pipelines
    alike, whatever its home folder; two platforms' ids never collide. Made by the first asker."""
    from flowops import statedb

    with statedb.reading(settings) as conn:
        tag = statedb.get_document(conn, PLATFORM_DOCUMENT)
    if tag is None:
        with statedb.transaction(settings) as conn:
            stmt = statedb.insert(conn, statedb.documents).values(
                name=PLATFORM_DOCUMENT, body=secrets.token_hex(3))
            conn.execute(stmt.on_conflict_do_nothing(index_elements=["name"]))
            tag = statedb.get_document(conn, PLATFORM_DOCUMENT)
    return str(tag)


def save_config(settings: Settings, config: LoopConfig) -> None:
    from flowops import statedb

    with statedb.transaction(settings) as conn:
        statedb.put_document(conn, CONFIG_DOCUMENT, config.model_dump(mode="json"))


def load_config(settings: Settings) -> LoopConfig:
    from flowops import statedb

    with statedb.reading(settings) as conn:
        body = statedb.get_document(conn, CONFIG_DOCUMENT)
    return LoopConfig() if body is None else validated(LoopConfig, "saved loop config", **body)


def parse_config(raw: dict[str, Any]) -> LoopConfig:
    """A LoopConfig from CLI values (None = the default); one clear line when one is out of range."""
    return validated(LoopConfig, "invalid loop setting", **{k: v for k, v in raw.items()
                                                             if v is not None})


def _dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json", exclude_none=True)


class RolloutStore:
    """The one reader and writer of the rollout records and the controller's heartbeat."""

    def __init__(self, settings: Settings):
        self.settings = settings

    @staticmethod
    def _load(conn) -> LoopState:
        from flowops import statedb

        table = statedb.rollouts
        rows = conn.execute(table.select().order_by(table.c.position)).all()
        return validated(LoopState, "loop state in the state database",
                         rollouts={r.id: r.record for r in rows}, order=[r.id for r in rows],
                         controller=statedb.get_document(conn, CONTROLLER_DOCUMENT) or {})

    def read(self) -> LoopState:
        from flowops import statedb

        with statedb.reading(self.settings) as conn:
            return self._load(conn)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[LoopState]:
        """The state to change in place; written when the block ends without error (one database
        transaction holding the loop's lock, so concurrent writers queue)."""
        from flowops import statedb

        with statedb.transaction(self.settings) as conn:
            statedb.lock(conn, "loop-state")
            state = self._load(conn)
            before = {rid: _dump(r) for rid, r in state.rollouts.items()}
            positions = {rid: i for i, rid in enumerate(state.order)}
            controller = _dump(state.controller)
            yield state
            for position, rid in enumerate(state.order):
                record = _dump(state.rollouts[rid])
                if before.get(rid) != record or positions.get(rid) != position:
                    stmt = statedb.insert(conn, statedb.rollouts).values(
                        id=rid, position=position, record=record)
                    conn.execute(stmt.on_conflict_do_update(
                        index_elements=["id"],
                        set_={"position": stmt.excluded.position, "record": stmt.excluded.record}))
            if _dump(state.controller) != controller:
                statedb.put_document(conn, CONTROLLER_DOCUMENT, _dump(state.controller))

    def get(self, rid: str) -> RolloutRecord:
        record = self.read().rollouts.get(rid)
        if record is None:
            raise NotFound(f"no rollout {rid!r} in the state database")
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
