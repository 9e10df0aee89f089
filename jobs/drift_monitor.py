"""Check live-input windows for drift against the served model's training data (a Ray job).

    python -m jobs.drift_monitor --window /path/window.npy [--model models:/digits-classifier@production]
    python -m jobs.drift_monitor --watch /path/windows/ --interval 60 [--max-checks N]

Each check writes <home>/drift/latest.json (exported as flowops_drift_* gauges), logs a report to
MLflow (experiment drift-monitor) and, when the window drifted, appends a `drift_detected` event to
the loop's event log (unless --no-trigger).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flowops.entrypoint import run_entrypoint


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--window", type=Path, help="one window file (.npy or .parquet) to check")
    source.add_argument("--watch", type=Path, help="folder to watch for new window files")
    parser.add_argument("--model", default=None, help="model URI (default models:/<name>@production)")
    parser.add_argument("--data-version", default=None, help="reference data version (default: the "
                        "model's training data version, else the latest)")
    parser.add_argument("--interval", type=float, default=60.0, help="seconds between polls (--watch)")
    parser.add_argument("--max-checks", type=int, default=None, help="stop after N checks (--watch)")
    parser.add_argument("--stop-after", type=float, default=None, help="stop after N seconds (--watch)")
    parser.add_argument("--alpha", type=float, default=0.01, help="family-wise level of the KS tests")
    parser.add_argument("--correction", choices=["bonferroni", "bh"], default="bonferroni")
    parser.add_argument("--class-test", choices=["chi2", "psi"], default="chi2")
    parser.add_argument("--no-trigger", action="store_true", help="never emit drift_detected")
    args = parser.parse_args()

    from flowops import drift
    from flowops.settings import get_settings

    settings = get_settings()
    config = drift.make_config(alpha=args.alpha, correction=args.correction, class_test=args.class_test)
    common = {"model_uri": args.model, "data_version": args.data_version, "config": config,
              "trigger": not args.no_trigger}
    if args.window:
        reports = [drift.run_drift_check(settings, args.window, **common)]
    else:
        reports = drift.watch(settings, args.watch, interval_s=args.interval,
                              max_checks=args.max_checks, stop_after_s=args.stop_after, **common)
    for report in reports:
        print(json.dumps({"drifted": report.drifted, "score": report.score, "n": report.n,
                          "drifted_features": report.drifted_features,
                          "class_drifted": report.class_drifted,
                          "model_version": report.model_version}), flush=True)


if __name__ == "__main__":
    run_entrypoint(main)
