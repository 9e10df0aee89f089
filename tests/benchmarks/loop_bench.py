"""Benchmark of the continuous training loop (writes loop_bench.json next to this file).

    .venv/bin/python tests/benchmarks/loop_bench.py [--home DIR] [--threshold N]

Runs the real demo story on a fresh embedded stack (own home folder and free ports) and measures:

* threshold reached → the new version serving 100% of traffic (goal: < 180 s on 2 cores);
* decisive evidence → 100% stable on a rollback (goal: < 5 s);
* failed user requests (5xx or no answer) of the generated traffic during canary and rollback
  (goal: 0).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).with_name("loop_bench.json")


def _free_ports(n: int) -> list[int]:
    from flowops.ray_client import free_port

    ports: list[int] = []
    while len(ports) < n:
        port = free_port()
        if 20000 <= port <= 60000 and port not in ports:
            ports.append(port)
    return ports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--home", default=None, help="home folder (default: a new temp folder)")
    parser.add_argument("--threshold", type=int, default=60)
    parser.add_argument("--keep", action="store_true", help="leave the stack running")
    args = parser.parse_args()

    home = Path(args.home or tempfile.mkdtemp(prefix="fo-loop-bench-", dir="/tmp"))
    names = ["RAY_PORT", "DASHBOARD_PORT", "CLIENT_PORT", "SERVE_PORT", "METRICS_PORT",
             "MLFLOW_PORT"]
    os.environ["FLOWOPS_HOME"] = str(home)
    for name, port in zip(names, _free_ports(len(names)), strict=True):
        os.environ.setdefault(f"FLOWOPS_{name}", str(port))

    from flowops import stack
    from flowops.demo import DemoConfig, run_demo
    from flowops.settings import get_settings

    settings = get_settings()
    started = time.time()
    try:
        result = run_demo(settings, say=lambda m: print(m, flush=True),
                          config=DemoConfig(threshold=args.threshold))
    finally:
        if not args.keep:
            stack.down(settings)
    rows = result["timeline"]
    promoted = [r for r in rows if r["outcome"] == "promoted" and r.get("threshold_to_100_s")]
    rolled = [r for r in rows if r["outcome"] == "rolled_back"]
    report = {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                    "platform": platform.platform()},
        "threshold_labels": args.threshold,
        "threshold_to_100pct_s": promoted[-1]["threshold_to_100_s"] if promoted else None,
        "rollback_evidence_to_100pct_stable_s": rolled[-1].get("rollback_s") if rolled else None,
        "rollback_reasons": rolled[-1].get("reasons") if rolled else None,
        "requests_sent": result["traffic"]["sent"],
        "failed_requests": result["traffic"]["failed"],
        "requests_by_version": result["traffic"]["by_version"],
        "stages": {r["rollout"]: r["stages"] for r in rows},
        "demo_wall_s": round(time.time() - started, 1),
        "goals": {"threshold_to_100pct_s": 180, "rollback_s": 5, "failed_requests": 0},
    }
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "stages"}, indent=2))


if __name__ == "__main__":
    main()
