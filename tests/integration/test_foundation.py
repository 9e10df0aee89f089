"""The foundation on the real shared cluster: stack, data versions, the job submission layer."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from flowops import jobs, tracking
from flowops.data_check import DataCheckConfig
from flowops.errors import JobFailed
from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.integration
# What Ray logs for each of its default excludes (.git, .venv, ...) found in a working directory.
RAY_EXCLUDE_WARNING = "is now ignored by default when packaging the working directory"


def test_up_again_is_a_noop_and_status_is_healthy(stack):
    again = run_cli("up", "--json", check=True)
    result = json.loads(again.stdout)
    assert result["started"] == [] and result["repaired"] == []
    assert set(result["already_running"]) >= {"ray", "serve", "mlflow", "workspace"}
    report = json.loads(run_cli("status", "--json", check=True).stdout)
    assert report["healthy"] is True
    assert report["ray"]["job_api"] == stack.job_api
    assert report["serve"]["healthy"] is True


def test_token_is_private_and_required(stack):
    mode = stat.S_IMODE(os.stat(stack.token_path).st_mode)
    assert mode == 0o600
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    out = subprocess.run(
        [sys.executable, "-m", "ray.scripts.scripts", "job", "list", "--address", stack.job_api],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert out.returncode != 0
    assert "authentication" in (out.stdout + out.stderr).lower()


def test_data_init_versions_and_show(dataset, stack):
    versions = json.loads(run_cli("data", "versions", "--json", check=True).stdout)
    assert [v["id"] for v in versions][:1] == [dataset]
    shown = json.loads(run_cli("data", "show", dataset, "--json", check=True).stdout)
    assert shown["counts"]["holdout"] == 360


def test_data_check_runs_as_a_ray_job_and_logs_to_mlflow(dataset, stack):
    out = run_cli("data", "check", "--data-version", dataset, check=True)
    assert "SUCCEEDED" in out.stdout
    assert RAY_EXCLUDE_WARNING not in out.stdout + out.stderr  # .git/.venv excluded explicitly
    listed = json.loads(run_cli("jobs", "list", "--json", check=True).stdout)
    checks = [j for j in listed if j["workload"] == "data_check" and j["status"] == "SUCCEEDED"]
    assert checks and checks[-1]["metadata"]["data_version"] == dataset
    client = tracking.configure_mlflow(stack)
    exp = client.get_experiment_by_name("data-checks")
    runs = client.search_runs([exp.experiment_id], f"tags.data_version = '{dataset}'")
    assert runs and runs[0].data.metrics["images"] == 1797


def test_job_submitters_answer_in_json_and_logs_follow_exits_with_the_outcome(dataset, stack):
    out = run_cli("data", "check", "--data-version", dataset, "--json", check=True)
    report = json.loads(out.stdout)  # all of stdout is one JSON object
    assert report["job_id"].startswith("data-check-") and report["status"] == "SUCCEEDED"
    assert report["workload"] == "data_check"
    assert report["result"]["version"] == dataset and report["result"]["ok"] is True
    assert f"data version {dataset} OK" in out.stderr  # the job's log streamed to stderr
    assert RAY_EXCLUDE_WARNING not in out.stderr
    followed = run_cli("jobs", "logs", "-f", report["job_id"])
    assert followed.returncode == 0 and f"data version {dataset} OK" in followed.stdout
    assert f"job {report['job_id']} (data_check) SUCCEEDED" in followed.stderr

    bad_config = ["--", "--config", '{"data_version": "v999"}']
    failed = run_cli("jobs", "submit", "data_check", "--json", *bad_config)
    assert failed.returncode == JobFailed.exit_code
    report = json.loads(failed.stdout)
    assert report["status"] == "FAILED" and report["result"] is None
    assert failed.stderr.strip().splitlines()[-1].startswith(f"error: job {report['job_id']} "
                                                             "(data_check) FAILED")

    queued = run_cli("jobs", "submit", "data_check", "--no-wait", "--json", *bad_config, check=True)
    submitted = json.loads(queued.stdout)
    assert submitted["job_id"].startswith("data-check-") and submitted["status"] in (
        "PENDING", "RUNNING", "FAILED")
    followed = run_cli("jobs", "logs", "-f", submitted["job_id"])
    assert followed.returncode == JobFailed.exit_code  # the job's outcome, in one line
    assert followed.stderr.strip().splitlines()[-1].startswith(
        f"error: job {submitted['job_id']} (data_check) FAILED")


def test_workload_through_the_ray_cli_with_the_token(dataset, stack):
    env = {
        **os.environ, **stack.ray_auth_env(), "RAY_API_SERVER_ADDRESS": stack.job_api,
    }
    runtime_env = json.dumps({"env_vars": stack.job_env()})
    out = subprocess.run(
        [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--working-dir", ".",
         "--runtime-env-json", runtime_env, "--",
         "python", "-m", "jobs.data_check", "--config", json.dumps({"data_version": dataset})],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"data version {dataset} OK" in out.stdout


def test_pipeline_stops_at_the_failed_step_and_is_recorded(dataset, stack):
    steps = [
        jobs.Step("check", "data_check", DataCheckConfig(data_version=dataset)),
        jobs.Step("check-missing", "data_check", DataCheckConfig(data_version="v999")),
        jobs.Step("never", "data_check", DataCheckConfig(data_version=dataset)),
    ]
    with pytest.raises(JobFailed, match="check-missing.*v999"):
        jobs.run_pipeline(stack, "foundation-test", steps, pipeline_id="pipe-fail-1")
    recorded = json.loads(run_cli("jobs", "pipelines", "--json", check=True).stdout)
    run = next(r for r in recorded if r["id"] == "pipe-fail-1")
    assert [s["status"] for s in run["steps"]] == ["SUCCEEDED", "FAILED", "SKIPPED"]
    assert run["status"] == "FAILED" and "v999" in run["message"]


def test_pipeline_restart_adopts_the_submitted_job(dataset, stack):
    """A runner that died after submitting resumes without a duplicate job."""
    pid = "pipe-resume-1"
    step = jobs.Step("check", "data_check", DataCheckConfig(data_version=dataset))
    job_id = f"{pid}--0-check"
    jobs.submit(stack, "data_check", step.config, submission_id=job_id)
    step.job_id, step.status = job_id, "RUNNING"
    jobs.save_pipeline(stack, jobs.PipelineRun(id=pid, name="resume", steps=[step],
                                               status="RUNNING"))
    done = jobs.run_pipeline(stack, "resume", [step], pipeline_id=pid)
    assert done.status == "SUCCEEDED"
    ids = [j.id for j in jobs.list_jobs(stack) if j.id.startswith(pid)]
    assert ids == [job_id]


@pytest.mark.parametrize(
    "args, message",
    [
        (["jobs", "submit", "no_such_workload"], "unknown workload 'no_such_workload'; known"),
        (["jobs", "submit", "data_check", "--", "--config", '{"version": "v1"}'],
         "--config (DataCheckConfig): version: Extra inputs are not permitted"),
        (["data", "check", "--data-version", "v999"], "data version 'v999' does not exist"),
        (["jobs", "status", "no-such-job"], "no job 'no-such-job'"),
        (["data", "init", "--from", "/nonexistent"], "not a folder"),
    ],
)
def test_bad_input_is_one_clear_line(dataset, args, message):
    out = run_cli(*args)
    assert out.returncode != 0
    assert message in out.stderr
    assert "Traceback" not in out.stderr + out.stdout


def test_no_cluster_is_one_clear_line(stack):
    out = run_cli("jobs", "list", env={"FLOWOPS_DASHBOARD_PORT": "29999"})
    assert out.returncode == 5
    assert "no Ray cluster answers at http://127.0.0.1:29999" in out.stderr
    assert "Traceback" not in out.stderr
