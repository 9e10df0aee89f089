"""The command line's contract with people and scripts, checked without a cluster: every command's
--help, --version, the exit-code table (help and README), and `--json` = one JSON object on stdout.

Commands whose --json needs a cluster are covered in tests/integration (test_foundation, test_train).
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from flowops.cli.main import build_app, version
from flowops.errors import exit_codes
from tests.conftest import REPO

COMMAND = typer.main.get_command(build_app())


def _walk(command, path: tuple[str, ...] = ()):
    """Every command and group under `command` (Typer builds on its own copy of click's classes)."""
    yield path, command
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from _walk(sub, (*path, name))


def _options(command) -> list:
    return [p for p in command.params if p.param_type_name == "option"]


COMMANDS = dict(_walk(COMMAND))
LEAVES = sorted(p for p, c in COMMANDS.items() if not hasattr(c, "commands"))


def _flowops(*args: str, home) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flowops.cli.main", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=180,
                          env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                               "FLOWOPS_HOME": str(home), "FLOWOPS_DASHBOARD_PORT": "29998",
                               "PYTHONPATH": os.environ.get("PYTHONPATH", "")})


def test_the_walk_finds_the_command_tree():
    paths = {" ".join(p) for p in COMMANDS}
    assert {"", "train", "jobs submit", "loop canary", "monitor prometheus start",
            "models reproduce", "devenv list"} <= paths
    assert len(paths) > 50


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=lambda p: " ".join(p) or "flowops")
def test_every_command_has_help_that_exits_zero(path):
    out = CliRunner().invoke(build_app(), [*path, "--help"], prog_name="flowops")
    assert out.exit_code == 0, out.output
    assert f"flowops {' '.join(path)}".strip() in out.output  # its own usage line


@pytest.mark.parametrize("path", LEAVES, ids=lambda p: " ".join(p))
def test_every_option_says_what_it_does(path):
    assert [o.opts[0] for o in _options(COMMANDS[path]) if not (o.help or "").strip()] == []


def test_no_option_means_two_things():
    """`--version` is the program's version only; data and model versions have their own names."""
    assert [" ".join(p) for p, c in COMMANDS.items()
            if any("--version" in o.opts for o in _options(c))] == [""]


def test_commands_that_submit_a_job_can_answer_in_json():
    waiting = [p for p, c in COMMANDS.items() if any("--no-wait" in o.opts for o in _options(c))]
    assert len(waiting) >= 5  # jobs submit, data check, train, tune, pseudo-label
    assert [p for p in waiting if not any("--json" in o.opts for o in _options(COMMANDS[p]))] == []


def test_version_prints_the_package_version(tmp_path):
    out = _flowops("--version", home=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"flowops {version()}"
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", version())


def test_help_shows_the_exit_codes_and_completion(tmp_path):
    out = _flowops("--help", home=tmp_path)
    assert out.returncode == 0
    for code, meaning, name, _ in exit_codes():
        assert re.search(rf"^\W*{code}\s+{meaning}\s+{name}", out.stdout, re.M), (code, meaning)
    assert "--install-completion" in out.stdout and "--show-completion" in out.stdout


def test_the_exit_codes_are_the_errors_codes():
    rows = {code: name for code, _, name, _ in exit_codes()}
    assert rows == {0: "", 1: "FlowOpsError", 2: "InvalidInput", 3: "NotFound", 4: "Conflict",
                    5: "ClusterUnavailable", 6: "GateFailed", 7: "JobFailed", 130: ""}


def test_readme_shows_the_same_exit_codes():
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Exit codes"):]
    section = section[: section.index("\n## ", 3)]
    for code, meaning, name, _ in exit_codes():
        assert re.search(rf"^\| {code} \| {meaning} \| {f'`{name}`' if name else ''}\s*\|", section,
                         re.M), (code, meaning, name)


@pytest.mark.parametrize("args, code", [
    (["data", "versions", "--json"], 0),
    (["devenv", "list", "--json"], 0),
    (["jobs", "pipelines", "--json"], 0),
    (["loop", "report", "--json"], 0),
    (["cluster", "validate", "--overlay", "dev", "--json"], 0),
    (["status", "--json"], 5),
])
def test_json_output_is_one_json_object_alone_on_stdout(tmp_path, args, code):
    out = _flowops(*args, home=tmp_path)
    assert out.returncode == code, out.stderr
    json.loads(out.stdout)  # the whole of stdout parses: no line before or after


def test_unhealthy_status_exits_5_with_the_report_and_one_line(tmp_path):
    out = _flowops("status", "--json", home=tmp_path)
    assert out.returncode == 5
    assert json.loads(out.stdout)["ray"]["healthy"] is False
    assert out.stderr.startswith("error: unhealthy: ray") and out.stderr.count("\n") == 1


def test_a_failed_json_command_prints_its_error_on_stderr_only(tmp_path):
    out = _flowops("jobs", "submit", "data_check", "--json", home=tmp_path)
    assert out.returncode == 5
    assert out.stdout == ""
    assert out.stderr.startswith("error: no Ray cluster answers at http://127.0.0.1:29998")


def test_submissions_exclude_heavy_folders_so_ray_does_not_warn(caplog):
    """Ray warns about each of its default excludes (.git, .venv, ...) present in a working
    directory; FlowOps names them itself and turns Ray's defaults off while packaging."""
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed
    from ray.util.debug import reset_log_once

    from flowops import jobs
    from flowops.settings import get_settings

    renv = jobs.runtime_env(get_settings())
    assert {".git", ".venv", "venv", "__pycache__", ".flowops"} <= set(renv["excludes"])
    logger = logging.getLogger("test-packaging")
    uploaded = []

    def package():
        reset_log_once()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="test-packaging"):
            upload_working_dir_if_needed(dict(renv), include_gitignore=True, logger=logger,
                                         upload_fn=lambda *a, **k: uploaded.append(k))
        return [r.getMessage() for r in caplog.records if "ignored by default" in r.getMessage()]

    assert (REPO / ".git").exists()
    assert package() != []  # what Ray says on its own: the check below can fail
    with jobs.ray_default_excludes_off():
        assert package() == []
    assert {".git", ".venv"} <= set(uploaded[-1]["excludes"])  # still left out, by FlowOps' list
    assert os.environ.get(jobs.RAY_DEFAULT_EXCLUDES_ENV) is None  # restored afterwards
