"""State database benchmark: label write latency and throughput on SQLite and PostgreSQL
(writes state_bench.json next to this file).

    .venv/bin/python tests/benchmarks/state_bench.py [--rounds 5] [--writes 300]

The workload is the label inbox's: `flowops.labels.record_labels` with one label per call (one
Label Studio annotation per webhook), each call one durable transaction (SQLite: WAL with
synchronous=FULL; PostgreSQL: a throw-away local server from tests/pg.py with its defaults,
fsync and synchronous_commit on). Per backend and round:

* latency: `--writes` sequential calls, the median and p95 of one call;
* throughput, one writer: labels per second of those calls;
* throughput, 4 writer processes: 4 processes each writing `--writes / 2` labels from a common
  start time; all labels over the time to the last one's end.

Backends: `sqlite` and `postgresql` (this code, through SQLAlchemy), and `sqlite-raw` (the inbox
before the state database, raw sqlite3, loaded from git commit BASELINE; skipped without git).
Rounds interleave the backends (rotating their order) and each gets a fresh database; the report
gives every round, the medians over rounds, and the PostgreSQL/SQLite ratio per round.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
OUT = Path(__file__).with_name("state_bench.json")
BASELINE = "057762d"  # main before the state database: labels.py on raw sqlite3
BACKENDS = ("sqlite", "postgresql", "sqlite-raw")
WRITERS = 4

CHILD = textwrap.dedent("""
    import json, sys, time
    sys.path.insert(0, sys.argv[4])
    from tests.benchmarks.state_bench import load_labels
    from flowops.settings import get_settings
    labels = load_labels(sys.argv[3] or None)
    s = get_settings()
    labels.counts(s)  # open (and migrate) before the clock starts
    name, n, start = sys.argv[1], int(sys.argv[2]), float(sys.argv[5])
    while time.time() < start:
        time.sleep(0.001)
    for i in range(n):
        labels.record_labels(s, [labels.Label(f"{name}-{i}", f"img{i}", str(i % 10))])
    print(json.dumps({"end": time.time()}))
""")


def load_labels(source: str | None):
    """flowops.labels, or the labels module of the file `source` (the raw-sqlite3 baseline)."""
    if source is None:
        from flowops import labels

        return labels
    if "labels_baseline" not in sys.modules:
        spec = importlib.util.spec_from_file_location("labels_baseline", source)
        sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up
        spec.loader.exec_module(sys.modules[spec.name])
    return sys.modules["labels_baseline"]


def _baseline_source(folder: Path) -> Path | None:
    out = subprocess.run(["git", "-C", str(REPO), "show", f"{BASELINE}:platform/flowops/labels.py"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        return None
    path = folder / "labels_baseline.py"
    path.write_text(out.stdout)
    return path


def _env(home: Path, url: str | None) -> dict[str, str]:
    env = {**os.environ, "FLOWOPS_HOME": str(home),
           "PYTHONPATH": os.pathsep.join([str(REPO / "platform"), str(REPO)])}
    env.pop("FLOWOPS_STATE_URL", None)
    if url:
        env["FLOWOPS_STATE_URL"] = url
    return env


def measure(backend: str, home: Path, url: str | None, source: Path | None, writes: int) -> dict:
    from flowops.settings import get_settings

    labels = load_labels(str(source) if backend == "sqlite-raw" else None)
    settings = get_settings(home=home, state_url=url)
    labels.counts(settings)  # create / migrate before timing
    times = []
    started = time.perf_counter()
    for i in range(writes):
        t0 = time.perf_counter()
        labels.record_labels(settings, [labels.Label(f"lat-{i}", f"img{i}", str(i % 10))])
        times.append(time.perf_counter() - t0)
    single = writes / (time.perf_counter() - started)

    per_writer = max(1, writes // 2)
    start = time.time() + 4.0  # every child has imported and opened the database by then
    children = [subprocess.Popen(
        [sys.executable, "-c", CHILD, f"w{k}", str(per_writer),
         str(source) if backend == "sqlite-raw" else "", str(REPO), str(start)],
        env=_env(home, url), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for k in range(WRITERS)]
    ends = []
    for child in children:
        out, err = child.communicate(timeout=600)
        if child.returncode != 0:
            raise RuntimeError(f"writer failed: {err[-2000:]}")
        ends.append(json.loads(out.strip().splitlines()[-1])["end"])
    if min(ends) <= start:
        raise RuntimeError("a writer started late; raise the start delay")
    assert labels.counts(settings)["total"] == writes + WRITERS * per_writer
    times.sort()
    return {"median_ms": round(statistics.median(times) * 1000, 3),
            "p95_ms": round(times[int(0.95 * (len(times) - 1))] * 1000, 3),
            "labels_per_s_1_writer": round(single, 1),
            f"labels_per_s_{WRITERS}_writers": round(WRITERS * per_writer / (max(ends) - start), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--writes", type=int, default=300, help="sequential writes per round")
    args = parser.parse_args()

    from tests.pg import start_postgres

    folder = Path(tempfile.mkdtemp(prefix="fo-state-bench-", dir="/tmp"))
    source = _baseline_source(folder)
    backends = [b for b in BACKENDS if b != "sqlite-raw" or source is not None]
    server = start_postgres()
    rounds = []
    try:
        for r in range(args.rounds):
            order = backends[r % len(backends):] + backends[:r % len(backends)]
            row = {}
            for backend in order:
                home = folder / f"r{r}-{backend}"
                url = server.create_database(f"bench_{r}") if backend == "postgresql" else None
                row[backend] = measure(backend, home, url, source, args.writes)
                print(r, backend, row[backend], flush=True)
            row["postgresql_over_sqlite"] = {k: round(row["postgresql"][k] / row["sqlite"][k], 2)
                                             for k in row["sqlite"]}
            rounds.append(row)
    finally:
        server.stop()
    keys = list(rounds[0]["sqlite"])
    medians = {b: {k: round(statistics.median(r[b][k] for r in rounds), 3) for k in keys}
               for b in backends}
    medians["postgresql_over_sqlite"] = {
        k: round(statistics.median(r["postgresql_over_sqlite"][k] for r in rounds), 2) for k in keys}
    report = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "workload": {"labels_per_call": 1, "writes_per_round": args.writes,
                     "concurrent_writers": WRITERS, "labels_per_writer": max(1, args.writes // 2),
                     "baseline_commit": BASELINE if source else None},
        "medians": medians,
        "rounds": rounds,
    }
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(medians, indent=2))


if __name__ == "__main__":
    main()
