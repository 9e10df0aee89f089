"""Benchmark: the same training loop (a) in one process, (b) under Ray Train with 1 worker, (c) with 2.

Same model, data and epochs in one run. Prints wall time, samples/s and the ratio to (a); the fixed
start-up cost (time to the first epoch's report) is measured apart from the steady per-epoch time
(mean gap between consecutive epoch reports, checkpointing included). Writes train_bench.json
beside this file. Goal: (b) within 1.15x of (a) per epoch.

    .venv/bin/python tests/benchmarks/train_bench.py [--epochs 8] [--repeat-data 8]

Starts its own embedded cluster (temp home, free ports) unless FLOWOPS_BENCH_USE_ENV=1, in which
case it uses the cluster and data of the FLOWOPS_* environment.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _free_port(used: set[int]) -> int:
    for port in range(41000 + (os.getpid() % 100) * 50, 60000):  # outside Ray's 10002-19999
        if port in used:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        used.add(port)
        return port
    raise RuntimeError("no free port")


def _own_cluster() -> Path:
    home = Path(tempfile.mkdtemp(prefix="fo-bench-", dir="/tmp"))
    used: set[int] = set()
    os.environ.update({
        "FLOWOPS_HOME": str(home),
        **{f"FLOWOPS_{k}_PORT": str(_free_port(used))
           for k in ("RAY", "DASHBOARD", "CLIENT", "SERVE", "METRICS", "MLFLOW")},
    })
    os.environ.pop("FLOWOPS_RAY_ADDRESS", None)
    return home


def _phases(reports: list[dict], started: float, finished: float) -> dict:
    reports = sorted(reports, key=lambda m: m["epoch"])
    stamps = [m["reported_at"] for m in reports]
    steady = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else float("nan")
    samples = sum(m["samples"] for m in reports)
    return {
        "wall_s": round(finished - started, 3),
        "startup_s": round(stamps[0] - started - steady, 3),
        "time_to_first_epoch_s": round(stamps[0] - started, 3),
        "per_epoch_s": round(steady, 4),
        "samples_per_epoch": int(reports[0]["samples"]),
        "samples_per_s_steady": round(reports[0]["samples"] / steady, 1),
        "samples_per_s_wall": round(samples / (finished - started), 1),
        "epochs": len(reports),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeat-data", type=int, default=8,
                        help="tile the digits train split N times so an epoch is not trivially short")
    parser.add_argument("--out", default=str(HERE / "train_bench.json"))
    args = parser.parse_args()

    own = os.environ.get("FLOWOPS_BENCH_USE_ENV") != "1"
    home = _own_cluster() if own else None
    from flowops import data, ray_client, stack
    from flowops.settings import get_settings

    settings = get_settings()
    try:
        if own:
            print(f"starting an embedded cluster in {home} ...", flush=True)
            stack.up(settings, with_serve=False)
        ray_client.apply_ray_auth_env(settings)
        if data.latest_version(settings) is None:
            data.init_dataset(settings)
        results = run(settings, args)
    finally:
        if own:
            stack.down(settings)
            shutil.rmtree(home, ignore_errors=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


def run(settings, args) -> dict:
    import pandas as pd
    import ray
    import torch

    from flowops import ray_client
    from flowops.train import TrainConfig, loop_config, plan, training_arrays
    from flowops.train_data import training_datasets
    from flowops.train_session import run_local, train_loop

    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, cpus_per_worker=1,
                         register_version=False)
    p = plan(settings, config)
    p.data.train = pd.concat([p.data.train] * args.repeat_data, ignore_index=True)
    arrays = training_arrays(p)
    results: dict = {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "torch": torch.__version__,
                    "ray": ray.__version__, "platform": platform.platform(),
                    "load_avg_at_start": os.getloadavg()[0]},
        "config": {"epochs": args.epochs, "batch_size": args.batch_size, "repeat_data": args.repeat_data,
                   "train_samples": len(p.data.train), "threads_per_worker": 1,
                   "data_version": p.data_version.tag, "model": "small CNN task (width=32)"},
        "runs": {},
    }

    with tempfile.TemporaryDirectory() as tmp:  # (a) the plain loop in this process
        loop = {**loop_config(p, "local", None, Path(tmp) / "a"), **arrays}
        started = time.time()
        run_local(train_loop, loop)
        finished = time.time()
        reports = [json.loads(ln) for ln in (Path(tmp) / "a" / "metrics.jsonl").read_text().splitlines()]
        results["runs"]["plain"] = _phases(reports, started, finished)
    print("plain loop", results["runs"]["plain"], flush=True)

    ray_client.connect(settings, log_to_driver=True, runtime_env={"env_vars": settings.job_env()})
    # the Ray Datasets `flowops train` hands Ray Train (decoded once: digits fit the object store)
    datasets = training_datasets(settings, p.data_version, {"train": p.data.train, "val": p.data.val},
                                 p.task.preprocess)
    for workers in (1, 2):  # (b), (c): Ray Train
        from ray.train import DataConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        loop = loop_config(p, "train", None, Path("/unused"))
        trainer = TorchTrainer(
            train_loop,
            train_loop_config=loop,
            datasets=datasets, dataset_config=DataConfig(datasets_to_split=["train"]),
            scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(name=f"bench-{workers}w-{int(time.time())}",
                                 storage_path=str(settings.home / "train-runs")),
        )
        started = time.time()
        result = trainer.fit()
        finished = time.time()
        reports = result.metrics_dataframe.to_dict("records")
        name = f"ray_{workers}_worker" + ("s" if workers > 1 else "")
        results["runs"][name] = _phases(reports, started, finished)
        print(name, results["runs"][name], flush=True)

    plain = results["runs"]["plain"]
    for r in results["runs"].values():
        r["per_epoch_ratio_to_plain"] = round(r["per_epoch_s"] / plain["per_epoch_s"], 3)
        r["wall_ratio_to_plain"] = round(r["wall_s"] / plain["wall_s"], 3)
    ratio = results["runs"]["ray_1_worker"]["per_epoch_ratio_to_plain"]
    results["goal"] = {"ray_1_worker_per_epoch_within": 1.15, "ratio": ratio, "met": ratio <= 1.15}
    print(f"{'run':16} {'wall s':>8} {'startup s':>10} {'epoch s':>8} {'samples/s':>10} "
          f"{'x plain/epoch':>14}")
    for name, r in results["runs"].items():
        print(f"{name:16} {r['wall_s']:8.2f} {r['startup_s']:10.2f} {r['per_epoch_s']:8.3f} "
              f"{r['samples_per_s_steady']:10.0f} {r['per_epoch_ratio_to_plain']:14.3f}")
    return results


if __name__ == "__main__":
    main()
