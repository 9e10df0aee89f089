"""The main job on the embedded stack (`make demo` / `flowops demo`): the whole FlowOps story.

up → data init → train v1 on 2 Ray Train workers → validate → promote + deploy → pseudo-label the
pool → the loop controller starts → simulated labelers label the most uncertain images → the
threshold is reached → v2 is fine-tuned from v1 → canary under generated traffic with feedback →
promoted; then a deliberately bad model (undertrained from scratch, validated against a lowered
gate) goes through the canary and is rolled back automatically. Ends with the timeline and URLs,
and checks its own story (`check_story`): v2 promoted on shown evidence, the bad model rolled back,
every user request answered 2xx; `make demo` exits non-zero otherwise.

`TrafficGenerator` (also used by the loop's tests and benchmark) sends holdout images to the
serving app (its Serve URL) at a bounded rate and reports the true label of some as feedback.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from flowops import data, events, images, jobs, labels, loop, queue, registry, serving, stack
from flowops.durable import wait_until
from flowops.errors import ClusterUnavailable, FlowOpsError, GateFailed, JobFailed
from flowops.pseudo_label import PseudoLabelConfig
from flowops.refs import ModelRef
from flowops.rollout import AnalysisConfig
from flowops.settings import Settings
from flowops.train import TrainConfig


class DemoConfig(BaseModel):
    """Sizes of the demo (small enough for ~10 minutes on 2 CPU cores)."""

    model_config = ConfigDict(extra="forbid")

    threshold: int = Field(60, ge=1, description="Labels that trigger the retrain.")
    epochs_v1: int = Field(30, ge=1)
    lr_v1: float = Field(0.01, gt=0)
    epochs_finetune: int = Field(10, ge=1)
    lr_finetune: float = Field(0.005, gt=0)
    workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(0.5, gt=0, description="Fractional, to fit beside serving.")
    rate_per_s: float = Field(40.0, gt=0, le=200, description="Generated requests per second.")
    users: int = Field(4, ge=1, le=32, description="Concurrent simulated users sharing the rate.")
    feedback_share: float = Field(0.5, ge=0, le=1)
    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig,
                                     description="The canary analysis (sequential tests).")
    bad_gate: float = Field(0.05, ge=0, le=1, description="Lowered gate for the bad model.")
    timeout_s: float = Field(900, gt=0, description="Longest wait for one rollout.")


# Traffic -----------------------------------------------------------------------------------------


class TrafficGenerator:
    """Bounded synthetic users of the Serve URL: each predicts a holdout image, then (sometimes) sends
    its true label as feedback. `users` threads share the rate, so the rate holds while a request
    waits. Counts every request and every failed one: any answer but 200, or no answer at all."""

    def __init__(self, settings: Settings, rate_per_s: float = 25.0, feedback_share: float = 0.5,
                 seed: int = 0, max_requests: int = 200_000, users: int = 4,
                 holdout: tuple[list, list[str]] | None = None):
        """`holdout`: the (pixel lists, labels) to send; by default the latest data version's
        holdout. Given, the users need no data version (a driver on a host without the data
        repository)."""
        self.url = settings.serve_url
        self.rate_per_s = min(rate_per_s, 200.0)
        self.feedback_share = feedback_share
        self.max_requests = max_requests
        self.seed, self.users = seed, users
        self.images, self.truth = holdout or holdout_images(settings)
        self.sent = self.failed = self.feedback = 0
        self.by_version: dict[str, int] = {}
        self.last_seen: dict[str, float] = {}  # when a client last got an answer of each version
        self.failures: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> TrafficGenerator:
        self._threads = [threading.Thread(target=self._run, args=(k,), name=f"flowops-user-{k}",
                                          daemon=True) for k in range(self.users)]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)
        return self.summary()

    def summary(self) -> dict[str, Any]:
        with self._lock:
            return {"sent": self.sent, "failed": self.failed, "feedback": self.feedback,
                    "by_version": dict(self.by_version), "failures": self.failures[-5:]}

    def _run(self, user: int) -> None:
        import httpx

        rng = random.Random(self.seed * 1000 + user)
        interval = self.users / self.rate_per_s
        with httpx.Client(timeout=10.0) as client:
            while not self._stop.is_set() and self.sent < self.max_requests:
                started = time.monotonic()
                self._one(client, rng)
                self._stop.wait(max(0.0, interval - (time.monotonic() - started)))

    def _failed(self, why: str) -> None:
        with self._lock:
            self.failed += 1
            self.failures.append((time.time(), why))

    def _one(self, client, rng: random.Random) -> None:
        import httpx

        i = rng.randrange(len(self.images))
        with self._lock:
            self.sent += 1
        try:
            resp = client.post(f"{self.url}/predict", json={
                "instances": [self.images[i]], "routing_key": f"user-{rng.random()}"})
        except httpx.HTTPError as exc:
            return self._failed(type(exc).__name__)
        if resp.status_code != 200:
            return self._failed(f"HTTP {resp.status_code}")
        pred = resp.json()["predictions"][0]
        version = str(pred["model_version"])
        with self._lock:
            self.by_version[version] = self.by_version.get(version, 0) + 1
            self.last_seen[version] = time.time()
        if rng.random() < self.feedback_share:
            try:
                fb = client.post(f"{self.url}/feedback",
                                 json={"request_id": pred["request_id"], "label": self.truth[i]})
            except httpx.HTTPError:
                return None
            with self._lock:
                self.feedback += fb.status_code == 200
        return None


def holdout_images(settings: Settings) -> tuple[list[list[list[int]]], list[str]]:
    """The latest version's holdout images (read where they are) as pixel lists, and labels."""
    import io

    from PIL import Image

    version = data.open_version(settings)
    holdout = version.rows("holdout")
    label_of = dict(zip(holdout["id"], holdout["label"], strict=True))
    pixels, truth = [], []
    for image_id, payload in images.iter_bytes(settings, version, holdout["id"]):
        with Image.open(io.BytesIO(payload)) as img:
            pixels.append(np.asarray(img.convert("L"), dtype=np.uint8).tolist())
        truth.append(label_of[image_id])
    if not pixels:
        raise FlowOpsError("the latest data version has no holdout images to send as traffic")
    return pixels, truth


# The story -----------------------------------------------------------------------------------


def _train_job(settings: Settings, run_name: str, config: TrainConfig, say) -> str:
    """Train as a Ray job (resumable pipeline); returns the registered model version."""
    pid = f"demo-{run_name}-{int(time.time())}"
    config = config.model_copy(update={"run_name": run_name,
                                       "data_version": data.resolve_version(settings, None)})
    jobs.run_pipeline(settings, "demo-train", [jobs.Step("train", "train", config)],
                      pipeline_id=pid, on_event=lambda run, step: say(
                          f"   job {step.job_id}: {step.status}"))
    return registry.version_registered_by(settings, run_name)


def wait_rollout(settings: Settings, rid: str, timeout_s: float, say) -> loop.RolloutRecord:
    """Follow a rollout's events until it is done; print each as it happens (the analysis' looks
    at most every 15 s: what each check still needs)."""
    store = loop.RolloutStore(settings)
    printed: set[str] = set()
    last_tick = [0.0]

    def finished() -> loop.RolloutRecord | None:
        for event in events.read_events(settings, rid):
            if event["key"] in printed:
                continue
            printed.add(event["key"])
            if event["event"] == "analysis_tick":
                if event["ts"] - last_tick[0] < 15:
                    continue
                last_tick[0] = event["ts"]
            say(f"   {time.strftime('%H:%M:%S', time.localtime(event['ts']))} "
                f"{rid} {_describe(event)}")
        record = store.get(rid)
        if record.done:
            return record
        _check_controller(settings)
        return None

    return wait_until(finished, timeout_s, interval_s=1.0, error=JobFailed,
                      what=f"the end of rollout {rid} (see `flowops loop status`)")


def _check_controller(settings: Settings) -> None:
    info = jobs.info(settings, loop.controller_submission_id(settings))
    if info.status in jobs.TERMINAL:
        raise JobFailed(jobs.failure_message(settings, info))


def _describe(event: dict[str, Any]) -> str:
    name = event["event"]
    extra = {
        "retrain_triggered": lambda e: f"({e.get('reason')})",
        "data_version_cut": lambda e: f"{e.get('data_version')} ({e.get('labels')} human labels)",
        "training_started": lambda e: f"fine-tuning v{e.get('base_version')} on "
                                      f"{e.get('data_version')}",
        "training_done": lambda e: f"model v{e.get('version')}",
        "canary_started": lambda e: f"v{e.get('version')} at {e.get('weight')}% beside "
                                    f"v{e.get('stable')}",
        "analysis_tick": lambda e: "; ".join(r.split(" (")[0] for r in e.get("reasons", []))[:160],
        "analysis_step": lambda e: f"{e.get('weight')}% passed "
                                   f"({e.get('evidence', {}).get('canary_requests')} canary "
                                   "requests)",
        "analysis_done": lambda e: f"{e.get('decision')}: {'; '.join(e.get('reasons', []))[:200]}",
        "rolled_back": lambda e: f"100% stable {e.get('rollback_s')}s after the decisive evidence",
        "promoted": lambda e: f"v{e.get('version')} serves 100% and is production",
    }.get(name, lambda e: f"v{e.get('version') or '-'}")
    return f"{name}: {extra(event)}"


def run_demo(settings: Settings, say: Callable[[str], None] = print,
             config: DemoConfig | None = None) -> dict[str, Any]:
    """The whole story; returns the timeline."""
    cfg = config or DemoConfig()
    say("1/8 starting the embedded stack (Ray, Serve, MLflow store, data workspace)")
    stack.up(settings)
    if data.latest_version(settings) is None:
        say("2/8 writing the default dataset (scikit-learn digits) as data version v1")
        data.init_dataset(settings)
    else:
        say(f"2/8 data version {data.latest_version(settings)} already exists")

    prod = registry.production_version(settings)
    if prod is None:
        say(f"3/8 training model v1 on {cfg.workers} Ray Train workers (a Ray job)")
        prod = _train_job(settings, f"demo-v1-{loop.platform_tag(settings)}",
                          TrainConfig(epochs=cfg.epochs_v1, lr=cfg.lr_v1, workers=cfg.workers,
                                      cpus_per_worker=cfg.cpus_per_worker), say)
        report = registry.validate_version(settings, prod)
        say(f"   validated v{prod}: {_gate_summary(report)}")
        registry.promote(settings, prod)
        say(f"   v{prod} is production")
    else:
        say(f"3/8 production model is v{prod} already")
    serving.deploy(settings, stable=prod)
    say(f"   serving v{prod} at {settings.serve_url} (docs: {settings.serve_url}/docs)")

    say("4/8 pseudo-labeling the unlabeled pool with production (Ray Data job)")
    jobs.run(settings, "pseudo_label", PseudoLabelConfig(
        model_uri=ModelRef.of(settings.model_name, prod).uri,
        data_version=data.resolve_version(settings, None)), metadata={"demo": "bootstrap"})

    say(f"5/8 starting the loop controller (threshold {cfg.threshold} labels) and user traffic")
    try:
        loop.stop_controller(settings)
    except FlowOpsError:
        pass
    loop.start_controller(settings, loop.LoopConfig(
        threshold=cfg.threshold, epochs=cfg.epochs_finetune, workers=cfg.workers,
        cpus_per_worker=cfg.cpus_per_worker, poll_s=1.0,
        train_overrides={"lr": cfg.lr_finetune}, analysis=cfg.analysis))
    traffic = TrafficGenerator(settings, cfg.rate_per_s, cfg.feedback_share, users=cfg.users).start()
    try:
        say(f"6/8 simulated labelers label the {cfg.threshold} most uncertain images")
        before = {r.id for r in loop.RolloutStore(settings).records()}
        result = queue.simulate_labels(settings, cfg.threshold)
        say(f"   {result['recorded']} labels from the {result['from']}; "
            f"inbox {labels.counts(settings)['new']} new")
        rid = _wait_new_rollout(settings, before)
        good = wait_rollout(settings, rid, cfg.timeout_s, say)
        say(f"   {rid}: {good.status}")

        say("7/8 a deliberately bad model: trained from scratch for 2 epochs at a tiny learning "
            f"rate, validated against a lowered gate ({cfg.bad_gate:.2f})")
        bad = _train_job(settings, f"demo-bad-{loop.platform_tag(settings)}-{int(time.time())}",
                         TrainConfig(epochs=2, lr=0.001, workers=1), say)
        rid = loop.submit_candidate(settings, bad, gate=_lowered_gate(cfg.bad_gate),
                                    reason="demo: a bad model goes through the canary")
        bad_record = wait_rollout(settings, rid, cfg.timeout_s, say)
        say(f"   {rid}: {bad_record.status}")
    finally:
        summary = traffic.stop()
        try:
            loop.stop_controller(settings)
        except FlowOpsError:
            pass
    say(f"   traffic: {summary['sent']} requests, {summary['failed']} failed, "
        f"{summary['feedback']} feedback labels; per version {summary['by_version']}")

    say("8/8 timeline (`flowops loop report`)")
    rows = loop.timeline.timeline(settings)
    for line in loop.timeline.format_timeline(rows):
        say("   " + line)
    say("")
    say(f"Ray dashboard : {settings.job_api}/#/jobs")
    say(f"MLflow UI     : {settings.tracking_uri} (experiments train, rollouts)")
    say(f"API docs      : {settings.serve_url}/docs")
    return {"timeline": rows, "traffic": summary, "good": good.status, "bad": bad_record.status}


def check_story(result: dict[str, Any]) -> list[str]:
    """What went wrong with the demo's story (empty when it was told): the retrained model
    promoted, the bad one rolled back, every user request answered 200."""
    problems = []
    if result.get("good") != "promoted":
        problems.append(f"the retrained model was {result.get('good')}, not promoted")
    if result.get("bad") != "rolled_back":
        problems.append(f"the bad model was {result.get('bad')}, not rolled back")
    traffic = result.get("traffic", {})
    if traffic.get("failed") or not traffic.get("sent"):
        problems.append(f"{traffic.get('failed')} of {traffic.get('sent')} user requests were not "
                        f"answered 200 (last: {traffic.get('failures')})")
    return problems


def run_and_check(settings: Settings, say: Callable[[str], None] = print,
                  config: DemoConfig | None = None) -> dict[str, Any]:
    """The demo, then its own check: GateFailed (exit 6) naming what went wrong."""
    result = run_demo(settings, say, config)
    problems = check_story(result)
    if problems:
        raise GateFailed("the demo did not tell its story: " + "; ".join(problems))
    say("story checked: v2 promoted on shown evidence, the bad model rolled back, "
        f"all {result['traffic']['sent']} user requests answered 200")
    return result


def _wait_new_rollout(settings: Settings, before: set[str], timeout_s: float = 120) -> str:
    store = loop.RolloutStore(settings)

    def new_rollout() -> str | None:
        new = [r.id for r in store.records() if r.id not in before]
        if not new:
            _check_controller(settings)
        return new[0] if new else None

    return wait_until(new_rollout, timeout_s, error=ClusterUnavailable,
                      what="the loop controller picking up the labels (see `flowops loop status`)")


def _gate_summary(report: Any) -> str:
    if isinstance(report, dict):
        keys = [k for k in ("holdout_accuracy", "accuracy", "macro_f1") if k in report]
        if keys:
            return ", ".join(f"{k} {report[k]:.3f}" for k in keys
                             if isinstance(report[k], int | float))
    return "passed"


def _lowered_gate(min_accuracy: float) -> dict[str, Any]:
    """The registry gate, lowered for the demo's bad model (floor and regression tolerance)."""
    return {"min_accuracy": min_accuracy, "max_regression": 1.0}
