"""`flowops loop start | status | stop | report | canary` and `flowops labels add | simulate`."""

from __future__ import annotations

from pathlib import Path

import typer

from flowops.cli._common import console, platform_settings, print_json
from flowops.cli.batch import labels_app

loop_app = typer.Typer(help="The continuous training loop: labels → retrain → canary → promote.",
                       no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(loop_app, name="loop")
    labels_app.command("add")(labels_add)
    labels_app.command("simulate")(labels_simulate)


def labels_add(
    file: Path = typer.Option(..., "--file", help="CSV with columns task_id,image_id,label."),
    annotator: str = typer.Option("", "--annotator", help="Who labeled them (recorded)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Record human labels from a CSV (validated against the latest data version; latest wins)."""
    from flowops import labels

    cfg = platform_settings(state=True, data=True)
    n = labels.add_labels_from_file(cfg, file, annotator)
    result = {"recorded": n, "inbox": labels.counts(cfg)}
    if as_json:
        print_json(result)
    else:
        console.print(f"recorded {n} label(s); inbox: {result['inbox']['new']} new of "
                      f"{result['inbox']['total']}")


def labels_simulate(
    count: int = typer.Option(..., "--count", help="How many images the simulated labelers do."),
    wrong: bool = typer.Option(False, "--wrong", help="Label them wrongly (a bad labeler)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Reveal the true labels of the COUNT most uncertain unlabeled images (from answers.csv)."""
    from flowops import queue

    result = queue.simulate_labels(platform_settings(state=True, data=True), count, wrong=wrong)
    if as_json:
        print_json(result)
    else:
        console.print(f"recorded {result['recorded']} simulated label(s) from the "
                      f"{result['from']}; inbox: {result['inbox']['new']} new")


@loop_app.command("start")
def start(
    threshold: int = typer.Option(50, "--threshold", help="New human labels that trigger a retrain."),
    max_age_s: float = typer.Option(None, "--max-age-s",
                                    help="Also retrain when the oldest new label is this old."),
    epochs: int = typer.Option(3, "--epochs", help="Fine-tuning epochs."),
    workers: int = typer.Option(2, "--workers", help="Ray Train workers."),
    placement_strategy: str = typer.Option("PACK", "--placement-strategy", help="How Ray places "
                                           "the workers: PACK, SPREAD, STRICT_PACK, STRICT_SPREAD "
                                           "(each on its own node)."),
    min_labels: int = typer.Option(10, "--min-labels", help="Fewest new labels a max-age or drift "
                                   "retrain uses (a drift verdict waits for them)."),
    steps: str = typer.Option("10,25,50,100", "--steps", help="Canary weights, ending with 100."),
    alpha: float = typer.Option(0.01, "--alpha", help="False rollback rate of an equal canary."),
    beta: float = typer.Option(0.05, "--beta", help="False promotion rate of a canary worse by a "
                               "margin."),
    accuracy_margin: float = typer.Option(0.05, "--accuracy-margin",
                                          help="Tolerated accuracy drop (0.05 = 5 points)."),
    error_margin: float = typer.Option(0.01, "--error-margin", help="Tolerated error-rate increase."),
    max_analysis_s: float = typer.Option(900, "--max-analysis-s", help="Deadline of the canary "
                                         "analysis: inconclusive by then = roll back."),
    no_pseudo_label: bool = typer.Option(False, "--no-pseudo-label",
                                         help="Do not refresh pseudo-labels after a promotion."),
    no_retrain_on_drift: bool = typer.Option(False, "--no-retrain-on-drift",
                                             help="Do not retrain when the drift monitor flags "
                                             "live inputs (by default: as soon as new labels exist)."),
    as_json: bool = typer.Option(False, "--json", help="Print the controller's job id and status "
                                 "as JSON."),
) -> None:
    """Start the controller as a Ray job (one per platform, i.e. per state database, whichever
    machine starts it; refuses if one is running)."""
    from flowops import jobs, loop
    from flowops.errors import InvalidInput

    try:
        weights = [int(w) for w in steps.split(",") if w.strip()]
    except ValueError:
        raise InvalidInput(f"--steps {steps!r}: comma-separated integers, e.g. 10,25,50,100") \
            from None
    raw = {"threshold": threshold, "max_age_s": max_age_s, "epochs": epochs, "workers": workers,
           "placement_strategy": placement_strategy,
           "min_labels": min_labels, "pseudo_label": not no_pseudo_label,
           "retrain_on_drift": not no_retrain_on_drift,
           "analysis": {"steps": weights, "alpha": alpha, "beta": beta,
                        "accuracy_margin": accuracy_margin, "error_margin": error_margin,
                        "max_duration_s": max_analysis_s}}
    config = loop.parse_config(raw)
    cfg = platform_settings(state=True, data=True)
    sid = loop.start_controller(cfg, config)
    if as_json:
        print_json(jobs.outcome(cfg, jobs.info(cfg, sid)))
        return
    console.print(f"loop controller started as Ray job [bold]{sid}[/bold] (threshold {threshold}, "
                  f"steps {weights}); follow it with `flowops loop status` / `flowops jobs logs {sid}`")


@loop_app.command("stop")
def stop(as_json: bool = typer.Option(False, "--json", help="Print the final status as JSON.")) -> None:
    """Stop the controller; a rollout in progress resumes where it was at the next start."""
    from flowops import loop

    cfg = platform_settings(state=True)
    status = loop.stop_controller(cfg)
    if as_json:
        print_json({"job_id": loop.controller_submission_id(cfg), "status": status})
        return
    console.print(f"loop controller {status}")


@loop_app.command("status")
def status(as_json: bool = typer.Option(False, "--json", help="Print the status as JSON.")) -> None:
    """The controller, the inbox, the last rollouts and their pipelines."""
    from flowops import loop

    report = loop.loop_status(platform_settings(state=True))
    if as_json:
        print_json(report)
        return
    c = report["controller"]
    console.print(f"controller: {c['status']} (job {c['job_id']}, heartbeat "
                  f"{c['heartbeat_age_s'] if c['heartbeat_age_s'] is not None else '-'}s ago)")
    inbox = report["inbox"]
    console.print(f"inbox: {inbox['new']} new label(s) of {inbox['total']} "
                  f"(threshold {report['config']['threshold']}); production model: "
                  f"v{report['production'] or '-'}")
    for r in report["rollouts"]:
        console.print(f"  {r['id']}: model v{r.get('model_version', '?')} data "
                      f"{r.get('data_version', '-')} stage {r.get('stage')} -> "
                      f"{r.get('status')} {'; '.join(r.get('reasons', []))[:160]}")
        if r.get("stage") == "analysis":  # how much more evidence each check needs
            for line in r.get("analysis", {}).get("waiting", []):
                console.print(f"      {line}")
    for p in report["pipelines"]:
        console.print(f"  pipeline {p['id']}: {p['status']}")


@loop_app.command("report")
def report(
    as_json: bool = typer.Option(False, "--json", help="Print the timeline as JSON."),
    html: Path = typer.Option(None, "--html", help="Write a rollout's HTML report (weight over "
                              "time, each check's bounds against its margin, the decision) here."),
    rollout: str = typer.Option(None, "--rollout", help="The rollout of --html (default: the latest)."),
) -> None:
    """The timeline of every rollout: threshold → data version → training → validation →
    canary → promoted or rolled back (with the rollback time)."""
    from flowops.durable import atomic_write_text
    from flowops.loop import timeline

    if html is not None:
        rid, page = timeline.rollout_page(platform_settings(state=True), rollout)
        atomic_write_text(html, page)
        console.print(f"wrote the report of rollout {rid} to {html}")
        return
    rows = timeline.timeline(platform_settings(state=True))
    if as_json:
        print_json(rows)
        return
    for line in timeline.format_timeline(rows):
        console.print(line)


@loop_app.command("canary")
def canary(
    model_version: str = typer.Option(..., "--model-version",
                                      help="Registered model version to roll out."),
    min_accuracy: float = typer.Option(
        None, "--min-accuracy",
        help="Lower the registry gate for this rollout: this accuracy floor and no regression "
        "check (demos)."),
    as_json: bool = typer.Option(False, "--json", help="Print the queued rollout as JSON."),
) -> None:
    """Queue a trained model version for validate → canary → promote/roll back (the running
    controller picks it up)."""
    from flowops import loop

    gate = {} if min_accuracy is None else {"min_accuracy": min_accuracy, "max_regression": 1.0}
    rid = loop.submit_candidate(platform_settings(state=True), model_version, gate=gate)
    if as_json:
        print_json({"rollout_id": rid, "model_version": model_version, "gate": gate})
        return
    console.print(f"queued rollout {rid} for model v{model_version}")
