"""The job submission layer: every workload is a Ray job
(`python -m flowops.workloads.<name> --config '<JSON>'`).

A workload's config is the same pydantic model on both sides: the client sends
`config.model_dump_json()`, the job parses it with that model (`flowops.entrypoint.run_job`).
Submits through Ray's `JobSubmissionClient` with the runtime environment a workload needs (the
project as working directory, the platform's settings as environment variables), readable
submission ids and metadata; follows, waits for, stops and lists jobs; and runs **pipelines**
(ordered jobs, each started when the previous one succeeded), recorded durably in the state
database (`flowops.statedb`).

Pipelines are resumable: a step's submission id is derived from the pipeline id, so a runner that
restarts (a controller killed mid-pipeline) adopts the job it had already submitted instead of
starting a duplicate.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import re
import shlex
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from flowops.durable import wait_until
from flowops.entrypoint import RESULT_PREFIX
from flowops.errors import ClusterUnavailable, Conflict, InvalidInput, JobFailed, NotFound
from flowops.settings import Settings

PROJECT_ROOT = Path(__file__).resolve().parents[2]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# What a job's working directory (the project) leaves out, every heavy local folder named here.
# Ray excludes `.git`, `.venv`, `venv` and `__pycache__` by default but warns about each one present
# on every submission; listing them here and turning Ray's defaults off keeps submissions quiet.
WORKING_DIR_EXCLUDES = [
    ".git", ".venv", "venv", ".flowops", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis",
    "tests/benchmarks/*.json", "*.egg-info", "build", "dist", "docs", "cluster", ".whl", ".gl", "mlruns",
]
RAY_DEFAULT_EXCLUDES_ENV = "RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES"
_ENV_LOCK = threading.Lock()  # submissions from several threads swap the variable one at a time


@dataclass
class JobInfo:
    id: str
    workload: str
    status: str
    entrypoint: str
    start_time: float | None
    end_time: float | None
    message: str
    metadata: dict[str, str]

    @property
    def duration_s(self) -> float | None:
        if self.start_time is None:
            return None
        end = self.end_time or time.time()
        return round(end - self.start_time, 1)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "duration_s": self.duration_s}


# Every workload: its entrypoint is `python -m flowops.workloads.<name> --config '<JSON>'` (the
# checkout's jobs/<name>.py), the JSON being the
# pydantic model named here (a test checks this list against the modules in `jobs/`).
WORKLOADS = {
    "controller": "flowops.loop:LoopConfig",
    "data_check": "flowops.data_check:DataCheckConfig",
    "drift_monitor": "flowops.drift_monitor:DriftMonitorConfig",
    "pseudo_label": "flowops.pseudo_label:PseudoLabelConfig",
    "train": "flowops.train:TrainConfig",
    "tune": "flowops.tune:TuneConfig",
}


def known_workloads() -> list[str]:
    """The workloads a job can run (the entrypoints in `jobs/`)."""
    return sorted(WORKLOADS)


def _check_workload(workload: str) -> None:
    known = known_workloads()
    if workload not in known:
        raise InvalidInput(f"unknown workload {workload!r}; known workloads: {', '.join(known)}")


def client(settings: Settings):
    """A JobSubmissionClient for the configured cluster, sending the token."""
    from flowops.ray_client import apply_ray_auth_env, require_cluster

    apply_ray_auth_env(settings)  # before Ray is imported: it reads RAY_AUTH_MODE once
    require_cluster(settings)
    from ray.job_submission import JobSubmissionClient
    try:
        return JobSubmissionClient(settings.job_api)
    except Exception as exc:  # noqa: BLE001 - Ray raises bare exceptions for connection errors
        raise ClusterUnavailable(f"cannot reach the Ray job API at {settings.job_api}: {exc}") from None


def runtime_env(settings: Settings, extra_env: dict[str, str] | None = None,
                py_modules: list[str] | None = None) -> dict[str, Any]:
    """The project as working directory when running from a checkout, the platform settings, and
    the packages of an engineer's task (`py_modules`: Ray uploads them for every node)."""
    from flowops.tracking import project_commit

    env = {**settings.job_env(), "FLOWOPS_GIT_COMMIT": project_commit(), **(extra_env or {})}
    renv: dict[str, Any] = {"env_vars": env}
    if py_modules:
        renv["py_modules"] = list(py_modules)
    if (PROJECT_ROOT / "jobs").is_dir() and (PROJECT_ROOT / "pyproject.toml").exists():
        renv["working_dir"] = str(PROJECT_ROOT)
        renv["excludes"] = WORKING_DIR_EXCLUDES
    return renv


def config_json(config: BaseModel | str | None) -> str | None:
    """A workload's config as JSON text: a model serialised, or text checked to be a JSON object."""
    if config is None:
        return None
    if isinstance(config, BaseModel):
        return config.model_dump_json()
    try:
        parsed = json.loads(config)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"--config is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise InvalidInput(f"--config must be a JSON object, got {config[:80]!r}")
    return config


def entrypoint(workload: str, config: BaseModel | str | None = None) -> str:
    """The shell command of a workload: `python -m flowops.workloads.<workload> --config '<JSON>'`
    (the modules of the checkout's `jobs/`, installed inside the package)."""
    text = config_json(config)
    return shlex.join(["python", "-m", f"flowops.workloads.{workload}",
                       *(["--config", text] if text else [])])


def new_submission_id(workload: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{workload.replace('_', '-')}-{stamp}-{uuid.uuid4().hex[:4]}"


def submit(
    settings: Settings,
    workload: str,
    config: BaseModel | str | None = None,
    *,
    submission_id: str | None = None,
    metadata: dict[str, str] | None = None,
    entrypoint_num_cpus: float = 0,
    entrypoint_num_gpus: float = 0,
    extra_env: dict[str, str] | None = None,
    py_modules: list[str] | None = None,
) -> str:
    """Submit `python -m flowops.workloads.<workload> --config <JSON>` as a Ray job; returns its id.

    `config` is the workload's pydantic model (or its JSON text); None runs it with defaults.
    """
    _check_workload(workload)
    command = entrypoint(workload, config)
    job_client = client(settings)
    sid = submission_id or new_submission_id(workload)
    meta = {"workload": workload, "user": getpass.getuser(), **(metadata or {})}
    meta = {k: str(v) for k, v in meta.items() if v is not None}
    try:
        with ray_default_excludes_off():
            job_client.submit_job(
                entrypoint=command,
                submission_id=sid,
                runtime_env=runtime_env(settings, extra_env, py_modules),
                metadata=meta,
                entrypoint_num_cpus=entrypoint_num_cpus,
                entrypoint_num_gpus=entrypoint_num_gpus,
            )
    except Exception as exc:  # noqa: BLE001
        text = str(exc)
        if "already exists" in text:
            raise Conflict(f"a job with submission id {sid!r} already exists") from None
        raise ClusterUnavailable(f"submitting {workload} failed: {text.splitlines()[0]}") from None
    _record_metric("submitted", workload)
    return sid


@contextlib.contextmanager
def ray_default_excludes_off() -> Iterator[None]:
    """While the working directory is packaged: Ray's default excludes off (WORKING_DIR_EXCLUDES
    names them), so Ray does not warn that it ignores `.git` and `.venv`."""
    with _ENV_LOCK:
        before = os.environ.get(RAY_DEFAULT_EXCLUDES_ENV)
        os.environ[RAY_DEFAULT_EXCLUDES_ENV] = ""
        try:
            yield
        finally:
            if before is None:
                os.environ.pop(RAY_DEFAULT_EXCLUDES_ENV, None)
            else:
                os.environ[RAY_DEFAULT_EXCLUDES_ENV] = before


def _record_metric(event: str, workload: str, duration_s: float | None = None) -> None:
    """Platform job metrics (observability); a no-op when the metrics module is absent."""
    try:
        from flowops import job_events as metrics
    except ImportError:
        return
    hook = getattr(metrics, "record_job_event", None)
    if hook:
        hook(event, workload, duration_s)


def info(settings: Settings, job_id: str, job_client=None) -> JobInfo:
    job_client = job_client or client(settings)
    try:
        details = job_client.get_job_info(job_id)
    except Exception:  # noqa: BLE001
        raise NotFound(f"no job {job_id!r} on {settings.job_api}; see `flowops jobs list`") from None
    return _to_info(details)


def _to_info(details) -> JobInfo:
    meta = dict(details.metadata or {})
    entry = details.entrypoint or ""
    match = re.search(r"-m jobs\.(\w+)", entry)
    return JobInfo(
        id=details.submission_id or details.job_id or "",
        workload=meta.get("workload") or (match.group(1) if match else "-"),
        status=str(getattr(details.status, "value", details.status)),
        entrypoint=entry,
        start_time=details.start_time / 1000 if details.start_time else None,
        end_time=details.end_time / 1000 if details.end_time else None,
        message=details.message or "",
        metadata=meta,
    )


def list_jobs(settings: Settings) -> list[JobInfo]:
    jobs = [_to_info(d) for d in client(settings).list_jobs() if d.submission_id]
    return sorted(jobs, key=lambda j: j.start_time or 0)


def logs(settings: Settings, job_id: str) -> str:
    job_client = client(settings)
    info(settings, job_id, job_client)
    return job_client.get_job_logs(job_id)


def stop(settings: Settings, job_id: str) -> bool:
    job_client = client(settings)
    info(settings, job_id, job_client)
    return job_client.stop_job(job_id)


def wait(
    settings: Settings,
    job_id: str,
    *,
    timeout_s: float | None = None,
    on_log: Callable[[str], None] | None = None,
    on_poll: Callable[[JobInfo], None] | None = None,
    poll_s: float = 1.0,
) -> JobInfo:
    """Wait for a job to end, passing new log text to `on_log` as it arrives and each polled
    status to `on_poll` (e.g. a heartbeat)."""
    job_client = client(settings)
    seen = 0

    def ended() -> JobInfo | None:
        nonlocal seen
        current = info(settings, job_id, job_client)
        if on_poll:
            on_poll(current)
        if on_log:
            text = job_client.get_job_logs(job_id)
            if len(text) > seen:
                on_log(text[seen:])
                seen = len(text)
        return current if current.status in TERMINAL else None

    current = wait_until(ended, timeout_s, interval_s=poll_s, what=f"the end of job {job_id}",
                         error=JobFailed)
    _record_metric("failed" if current.status == "FAILED" else "finished", current.workload,
                   current.duration_s)
    return current


def run(settings: Settings, workload: str, config: BaseModel | str | None = None,
        **kwargs) -> JobInfo:
    """Submit and wait; raise JobFailed with the job's last log line if it did not succeed."""
    on_log = kwargs.pop("on_log", None)
    timeout_s = kwargs.pop("timeout_s", None)
    job_id = submit(settings, workload, config, **kwargs)
    result = wait(settings, job_id, timeout_s=timeout_s, on_log=on_log)
    if result.status != "SUCCEEDED":
        raise JobFailed(failure_message(settings, result))
    return result


def result_from_logs(text: str) -> Any | None:
    """A job's result: the JSON of the last `RESULT <JSON>` line it printed (None without one)."""
    for line in reversed(text.splitlines()):
        if line.startswith(RESULT_PREFIX):
            try:
                return json.loads(line[len(RESULT_PREFIX):])
            except json.JSONDecodeError:
                return None
    return None


def outcome(settings: Settings, job: JobInfo, *, with_result: bool = False) -> dict[str, Any]:
    """What a script reads of a job (`--json` of the submitting commands): id, workload, status,
    duration, message and, with_result, the result a succeeded job printed."""
    report: dict[str, Any] = {"job_id": job.id, "workload": job.workload, "status": job.status,
                              "duration_s": job.duration_s, "message": job.message}
    if with_result:
        succeeded = job.status == "SUCCEEDED"
        report["result"] = result_from_logs(logs(settings, job.id)) if succeeded else None
    return report


def failure_message(settings: Settings, job: JobInfo) -> str:
    """One line: which job failed and the last error line of its logs."""
    reason = job.message
    try:
        lines = [ln for ln in logs(settings, job.id).splitlines() if ln.strip()]
        errors = [ln for ln in lines if "rror" in ln or ln.startswith("error:")]
        if errors or lines:
            reason = (errors or lines)[-1].strip()
    except Exception:  # noqa: BLE001 - the message is best effort
        pass
    return f"job {job.id} ({job.workload}) {job.status}: {reason[:300]}"


# Pipelines -------------------------------------------------------------------------------------


@dataclass
class Step:
    """One job of a pipeline; `config` is the workload's model, kept as its JSON text."""

    name: str
    workload: str
    config: BaseModel | str | None = None
    status: str = "PENDING"  # PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED, SKIPPED
    job_id: str | None = None
    started: float | None = None
    ended: float | None = None
    message: str = ""

    def __post_init__(self) -> None:
        self.config = config_json(self.config)


@dataclass
class PipelineRun:
    id: str
    name: str
    steps: list[Step]
    status: str = "PENDING"
    created: float = field(default_factory=time.time)
    ended: float | None = None
    message: str = ""
    metadata: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> PipelineRun:
        steps = [Step(**s) for s in raw.pop("steps")]
        return cls(steps=steps, **raw)


def save_pipeline(settings: Settings, run_: PipelineRun) -> None:
    """Record a pipeline run in the state database (replacing its previous record)."""
    from flowops import statedb

    with statedb.transaction(settings) as conn:
        stmt = statedb.insert(conn, statedb.pipelines).values(
            id=run_.id, created=run_.created, record=run_.to_dict())
        conn.execute(stmt.on_conflict_do_update(index_elements=["id"],
                                                set_={"record": stmt.excluded.record}))


def load_pipeline(settings: Settings, pipeline_id: str) -> PipelineRun | None:
    from flowops import statedb

    table = statedb.pipelines
    with statedb.reading(settings) as conn:
        row = conn.execute(table.select().where(table.c.id == pipeline_id)).first()
    return None if row is None else PipelineRun.from_dict(dict(row.record))


def list_pipelines(settings: Settings) -> list[PipelineRun]:
    """Every recorded pipeline run, oldest first."""
    from flowops import statedb

    table = statedb.pipelines
    with statedb.reading(settings) as conn:
        rows = conn.execute(table.select().order_by(table.c.created, table.c.id)).all()
    return [PipelineRun.from_dict(dict(r.record)) for r in rows]


def run_pipeline(
    settings: Settings,
    name: str,
    steps: list[Step],
    *,
    pipeline_id: str | None = None,
    metadata: dict[str, str] | None = None,
    on_event: Callable[[PipelineRun, Step], None] | None = None,
    on_log: Callable[[str], None] | None = None,
    on_poll: Callable[[JobInfo], None] | None = None,
    step_timeout_s: float | None = None,
) -> PipelineRun:
    """Run steps in order; each starts when the previous succeeded. Resumes a recorded run.

    Raises JobFailed naming the failed step; the record says which steps ran and how.
    """
    for step in steps:
        _check_workload(step.workload)
    pid = pipeline_id or new_submission_id(name)
    run_ = load_pipeline(settings, pid) or PipelineRun(
        id=pid, name=name, steps=steps, metadata=dict(metadata or {})
    )
    if run_.status == "SUCCEEDED":
        return run_
    if run_.status in TERMINAL:  # a recorded failure stays a failure: it is not silently re-run
        raise JobFailed(f"pipeline {pid} already ended {run_.status}: {run_.message}")
    run_.status = "RUNNING"
    save_pipeline(settings, run_)
    for index, step in enumerate(run_.steps):
        if step.status == "SUCCEEDED":
            continue
        job_id = step.job_id or f"{pid}--{index}-{step.name}"
        if step.job_id is None:
            step.job_id, step.started, step.status = job_id, time.time(), "RUNNING"
            save_pipeline(settings, run_)  # recorded before submitting: a restart adopts it
            if on_event:
                on_event(run_, step)
            try:
                submit(settings, step.workload, step.config, submission_id=job_id,
                       metadata={"pipeline": pid, "step": step.name, **run_.metadata})
            except Conflict:
                pass  # submitted before a restart: adopt the existing job
        result = wait(settings, job_id, on_log=on_log, on_poll=on_poll, timeout_s=step_timeout_s)
        step.status, step.ended = result.status, result.end_time or time.time()
        if result.status != "SUCCEEDED":
            step.message = failure_message(settings, result)
            run_.status, run_.ended = "FAILED", time.time()
            run_.message = f"step {step.name!r} {result.status}: {step.message}"
            for later in run_.steps[index + 1:]:
                later.status = "SKIPPED"
            save_pipeline(settings, run_)
            if on_event:
                on_event(run_, step)
            raise JobFailed(f"pipeline {pid} stopped at step {step.name!r}: {step.message}")
        save_pipeline(settings, run_)
        if on_event:
            on_event(run_, step)
    run_.status, run_.ended = "SUCCEEDED", time.time()
    save_pipeline(settings, run_)
    return run_
