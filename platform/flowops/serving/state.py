"""State shared by the replicas of one app: the routing and the exact per-version ledger.

It lives in one named, detached actor per app (`ServingState`). Replicas long-poll its routing, so
a change (a rollback) reaches every replica within milliseconds, and flush their counters to it
every 0.1 s through a `LedgerBuffer`. Nothing restarts when the weights change.

The ledger's totals (what the canary analysis reads: requests, errors, feedback, shadow
agreement, the latency histogram) are saved to the state database at every flush
(`save_totals`), and an actor that Ray restarts loads them back (`load_totals`): a dead actor
loses no counts, only its window of recent raw latencies and the predictions awaiting feedback.
Nor its routing: the first replica to find it gone hands back the routing it serves
(`adopt_routing`).
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import time
from typing import Any

import ray

from flowops.rollout import LATENCY_BUCKETS_MS
from flowops.settings import Settings

STATE_NAMESPACE = "flowops"
RECENT_LATENCIES = 2000
REMEMBERED_PREDICTIONS = 200_000
# Buckets of the Prometheus latency histogram (the ledger's own, finer ones are the canary
# analysis': rollout.LATENCY_BUCKETS_MS, 10 % apart).
METRIC_BUCKETS_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]
REPLICA_SEEN_S = 15  # a replica that has not reported for this long is gone
# What of a version's ledger entry is durable (the raw recent latencies are not).
DURABLE_KEYS = ("requests", "errors", "feedback_correct", "feedback_total", "shadow_agree",
                "shadow_total", "latency_sum_ms", "latency_hist")


def state_actor_name(app_name: str) -> str:
    return f"flowops-serving-{app_name}"


def _empty_entry() -> dict[str, Any]:
    return {"requests": 0, "errors": 0, "latencies_ms": collections.deque(maxlen=RECENT_LATENCIES),
            "latency_hist": [0] * (len(LATENCY_BUCKETS_MS) + 1), "latency_sum_ms": 0.0,
            "feedback_correct": 0, "feedback_total": 0, "shadow_agree": 0, "shadow_total": 0}


def save_totals(settings: Settings, app_name: str, totals: dict[str, dict[str, Any]],
                since: float) -> None:
    """Save the durable totals of the given versions of app `app_name` (one transaction)."""
    from flowops import statedb

    now = time.time()
    rows = [{"app": app_name, "version": version, "updated": now,
             "totals": {**{k: entry[k] for k in DURABLE_KEYS}, "since": since}}
            for version, entry in totals.items()]
    if not rows:
        return
    with statedb.transaction(settings) as conn:
        stmt = statedb.insert(conn, statedb.ledger_totals)
        conn.execute(stmt.on_conflict_do_update(
            index_elements=["app", "version"],
            set_={"totals": stmt.excluded.totals, "updated": stmt.excluded.updated}), rows)


def load_totals(settings: Settings, app_name: str) -> dict[str, dict[str, Any]]:
    """The saved totals of app `app_name` by version (each with the `since` of its ledger)."""
    from flowops import statedb

    table = statedb.ledger_totals
    with statedb.reading(settings) as conn:
        rows = conn.execute(table.select().where(table.c.app == app_name)).all()
    return {row.version: dict(row.totals) for row in rows}


def _bucket(value: float, bounds: list[float]) -> int:
    """Index of the first bound >= value (len(bounds): the open-ended last bucket)."""
    return bisect.bisect_left(bounds, value)


@ray.remote(num_cpus=0, max_restarts=-1)
class ServingState:
    """Routing and the exact per-version ledger of one app, shared by all of its replicas."""

    def __init__(self, app_name: str, settings_json: str) -> None:
        self.app_name = app_name
        self.settings = Settings.model_validate_json(settings_json)
        self.epoch = 0
        self.routing: dict[str, Any] | None = None
        self.deployment_hash: str | None = None
        self.changed = asyncio.Event()
        self.ledger: dict[str, dict[str, Any]] = collections.defaultdict(_empty_entry)
        self.predictions: collections.OrderedDict[str, tuple[str, str]] = collections.OrderedDict()
        self.replicas: dict[str, dict[str, Any]] = {}
        self.since = time.time()
        self.unsaved: set[str] = set()  # versions whose totals changed since the last save
        self.saving = asyncio.Lock()
        for version, totals in load_totals(self.settings, app_name).items():  # a restart
            self.since = min(self.since, float(totals.pop("since", self.since)))
            self.ledger[version].update({k: totals[k] for k in DURABLE_KEYS if k in totals})

    async def save(self, versions) -> None:
        """Save the totals of `versions` (and of any left unsaved by a failed save). A failure
        (the database unreachable) keeps them unsaved for the next flush instead of failing the
        flush: the replica would send its counts again and they would count twice."""
        self.unsaved.update(versions)
        async with self.saving:
            pending, self.unsaved = self.unsaved, set()
            totals = {v: {k: list(e[k]) if k == "latency_hist" else e[k] for k in DURABLE_KEYS}
                      for v in pending if (e := self.ledger.get(v)) is not None}
            try:
                await asyncio.to_thread(save_totals, self.settings, self.app_name, totals,
                                        self.since)
            except Exception as exc:  # noqa: BLE001 - kept for the next save
                self.unsaved |= pending
                print(f"ledger totals of {self.app_name} not saved yet: {exc}", flush=True)

    async def init_routing(self, routing: dict[str, Any], deployment_hash: str) -> tuple[int, dict]:
        """A replica starting: a new deployment's arguments win; a restart keeps runtime changes."""
        if self.routing is None or self.deployment_hash != deployment_hash:
            self.deployment_hash = deployment_hash
            await self.set_routing(routing)
        return self.epoch, self.routing

    async def adopt_routing(self, routing: dict[str, Any], deployment_hash: str,
                            epoch: int) -> tuple[int, dict]:
        """After a restart (the routing is not in the database, it lives here and in the
        replicas): the first replica to notice hands back the routing it serves, at its epoch."""
        if self.routing is None:
            self.deployment_hash, self.epoch = deployment_hash, epoch - 1
            await self.set_routing(routing)
        return self.epoch, self.routing

    async def set_routing(self, routing: dict[str, Any]) -> int:
        self.routing = dict(routing)
        self.epoch += 1
        self.changed.set()
        self.changed = asyncio.Event()
        return self.epoch

    async def get_routing(self) -> tuple[int, dict[str, Any] | None]:
        return self.epoch, self.routing

    async def wait_change(self, epoch: int, timeout_s: float) -> tuple[int, dict[str, Any] | None]:
        if epoch == self.epoch:
            try:
                await asyncio.wait_for(self.changed.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass
        return self.epoch, self.routing

    async def report_replica(self, replica: str, epoch: int, loaded: list[str]) -> None:
        self.replicas[replica] = {"epoch": epoch, "loaded": loaded, "seen": time.time()}

    async def flush(self, deltas: dict[str, dict[str, Any]], predictions: list[tuple]) -> None:
        for version, d in deltas.items():
            e = self.ledger[version]
            for key in ("requests", "errors", "shadow_agree", "shadow_total"):
                e[key] += d.get(key, 0)
            for ms in d.get("latencies_ms", ()):
                e["latencies_ms"].append(ms)
                e["latency_sum_ms"] += ms
                e["latency_hist"][_bucket(ms, LATENCY_BUCKETS_MS)] += 1
        for request_id, version, label in predictions:
            self.predictions[request_id] = (version, label)
        while len(self.predictions) > REMEMBERED_PREDICTIONS:
            self.predictions.popitem(last=False)
        await self.save(deltas)

    async def feedback(self, request_id: str, label: str) -> dict[str, Any] | None:
        """Count the true label of an earlier prediction once; None when the id is unknown."""
        found = self.predictions.pop(request_id, None)
        if found is None:
            return None
        version, predicted = found
        correct = predicted == label
        e = self.ledger[version]
        e["feedback_total"] += 1
        e["feedback_correct"] += int(correct)
        await self.save([version])
        return {"request_id": request_id, "version": version, "predicted": predicted,
                "label": label, "correct": correct}

    async def snapshot(self) -> dict[str, Any]:
        versions = {}
        for version, e in self.ledger.items():
            versions[version] = {**e, "latencies_ms": list(e["latencies_ms"]),
                                 "latency_buckets_ms": LATENCY_BUCKETS_MS}
        return {"since": self.since, "versions": versions}

    async def status(self) -> dict[str, Any]:
        now = time.time()
        self.replicas = {r: v for r, v in self.replicas.items() if now - v["seen"] < REPLICA_SEEN_S}
        return {"epoch": self.epoch, "routing": self.routing, "replicas": self.replicas,
                "deployment_hash": self.deployment_hash}


def get_state_actor(app_name: str, settings: Settings):
    """The app's state actor (started by the first replica that asks; it outlives the replicas
    and keeps its totals in `settings`' state database)."""
    return ServingState.options(
        name=state_actor_name(app_name), namespace=STATE_NAMESPACE, lifetime="detached",
        get_if_exists=True,
    ).remote(app_name, settings.model_dump_json())


class LedgerBuffer:
    """What one replica counted since its last flush to the state actor (which sums all replicas)."""

    def __init__(self) -> None:
        self.deltas: dict[str, dict[str, Any]] = collections.defaultdict(dict)
        self.predictions: list[tuple[str, str, str]] = []

    def count(self, version: str, key: str, n: int = 1) -> None:
        entry = self.deltas[version]
        entry[key] = entry.get(key, 0) + n

    def request(self, version: str, ms: float) -> None:
        self.count(version, "requests")
        self.deltas[version].setdefault("latencies_ms", []).append(round(ms, 3))

    def prediction(self, request_id: str, version: str, label: str) -> None:
        """Remembered by the state actor so that feedback on it counts for `version`."""
        self.predictions.append((request_id, version, label))

    async def flush(self, state) -> None:
        """Send the counts to `state`; on failure they stay here and the next flush retries."""
        if not self.deltas and not self.predictions:
            return
        deltas, self.deltas = dict(self.deltas), collections.defaultdict(dict)
        predictions, self.predictions = self.predictions, []
        try:
            await state.flush.remote(deltas, predictions)
        except Exception:  # noqa: BLE001 - the state actor restarts; keep the counts
            for version, d in deltas.items():
                for key, value in d.items():
                    if key == "latencies_ms":
                        self.deltas[version].setdefault(key, []).extend(value)
                    else:
                        self.count(version, key, value)
            self.predictions.extend(predictions)
