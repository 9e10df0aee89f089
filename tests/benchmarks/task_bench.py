"""Benchmark: training throughput of the built-in ResNet task (64x64 RGB), (a) a plain PyTorch loop
as an engineer writes it, (b) FlowOps's `train_loop` in this process (mode local), (c) the same
loop under Ray Train with 1 worker (the TorchTrainer `flowops train` builds).

All three train the task's network on the same preprocessed tensors (synthetic colour images
whose classes differ by colour, PNG-encoded and decoded by the task's `Preprocess`), with the same
batch size, Adam, cross-entropy, the task's flip augmentation, a DataLoader over a TensorDataset,
validation accuracy every epoch, and the same torch thread count. The variants run interleaved
`--rounds` times (order rotated each round); an epoch's time is the gap between consecutive epoch
ends (training, validation and, for FlowOps, the checkpoint and report), so the first epoch (start
-up, warm-up) is excluded. Ratios are paired round by round; medians are reported. Writes
task_bench.json beside this file. Goal: (c) >= 0.95 x (a) images/s per epoch.

Found with it: CPU determinism (`torch.use_deterministic_algorithms`) also fills every new tensor
with NaN (`fill_uninitialized_memory`), ~450 fills a step, ~5 % of a step's CPU time here;
`seed_everything` turns the fill off (same kernels, same weights).

    .venv/bin/python tests/benchmarks/task_bench.py [--images 1500] [--width 8] [--rounds 5]

Starts its own Ray head (temp dir, free ports, token auth, --cpus CPUs) for (c).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_ray import start_ray

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "platform"))

COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 210), "yellow": (210, 200, 40)}


def make_images(count: int, seed: int = 0) -> tuple[list[bytes], np.ndarray]:
    """PNG photos-to-be: a class colour (jittered) with noise and a dark square, 48-96 px a side."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    blobs, labels = [], rng.integers(0, len(names), count)
    for label in labels:
        h, w = rng.integers(48, 97, 2)
        base = np.array(COLOURS[names[label]]) + rng.integers(-30, 31, 3)
        img = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255)
        y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
        img[y0:y0 + h // 3, x0:x0 + w // 3] *= 0.3
        buf = io.BytesIO()
        Image.fromarray(img.astype(np.uint8)).save(buf, format="PNG")
        blobs.append(buf.getvalue())
    return blobs, labels.astype(np.int64)


def plain_loop(task, classes, x_train, y_train, x_val, y_val, *, epochs, batch_size, lr, seed,
               threads) -> list[dict]:
    """(a): the single-device loop an engineer writes; one record per epoch end."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    torch.use_deterministic_algorithms(False)  # (b) in this process turns it on; (a) never would
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = task.build_model(classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    loader = DataLoader(TensorDataset(torch.from_numpy(x_train), torch.from_numpy(y_train)),
                        batch_size=batch_size, shuffle=True)
    xv, yv = torch.from_numpy(x_val), torch.from_numpy(y_val)
    records = []
    for epoch in range(epochs):
        started = time.perf_counter()
        model.train()
        total, seen = 0.0, 0
        for xb, yb in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(task.augment(xb)), yb)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(yb)
            seen += len(yb)
        trained = time.perf_counter() - started
        model.eval()
        with torch.no_grad():
            correct = sum(int((model(xv[i:i + 512]).argmax(1) == yv[i:i + 512]).sum())
                          for i in range(0, len(yv), 512))
        records.append({"epoch": epoch, "samples": seen, "epoch_time_s": trained,
                        "train_loss": total / seen, "val_accuracy": correct / len(yv),
                        "reported_at": time.time()})
    return records


def flowops_local(loop: dict) -> list[dict]:
    """(b): `train_loop` in this process; the records are its metrics.jsonl."""
    from flowops.train_session import run_local, train_loop

    run_local(train_loop, loop)
    lines = (Path(loop["checkpoint_dir"]) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def ray_train(loop: dict, arrays: dict, storage: Path, name: str, threads: int) -> list[dict]:
    """(c): the TorchTrainer `run_ray_train` builds (same scaling, checkpoint and failure config,
    1 worker); the records are the metrics rank 0 reported, every epoch's (the Result keeps only
    those of the retained checkpoints), collected by a callback on the Ray Train controller."""
    import ray
    from ray.train import (
        CheckpointConfig,
        DataConfig,
        FailureConfig,
        RunConfig,
        ScalingConfig,
        UserCallback,
    )
    from ray.train.torch import TorchTrainer

    from flowops.train_session import train_loop

    storage.mkdir(parents=True, exist_ok=True)
    log = storage / f"{name}.jsonl"

    class EpochLog(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            with open(log, "a") as fh:
                fh.write(json.dumps(metrics[0], default=float) + "\n")

    trainer = TorchTrainer(
        train_loop, train_loop_config=loop,
        # the decoded images as the (x, y) Ray Datasets `flowops train` hands Ray Train
        datasets={part: ray.data.from_items([{"x": x, "y": y} for x, y in
                                             zip(arrays[f"x_{part}"], arrays[f"y_{part}"], strict=True)])
                  .materialize() for part in ("train", "val")},
        dataset_config=DataConfig(datasets_to_split=["train"]),
        scaling_config=ScalingConfig(num_workers=1, use_gpu=False,
                                     resources_per_worker={"CPU": threads}),
        run_config=RunConfig(name=name, storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=2),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             callbacks=[EpochLog()]),
    )
    trainer.fit()
    return [json.loads(line) for line in log.read_text().splitlines()]


def summary(records: list[dict], started: float, finished: float) -> dict:
    """Steady state: the gaps between consecutive epoch ends (the first epoch excluded)."""
    records = sorted(records, key=lambda m: m["epoch"])
    stamps = [float(m["reported_at"]) for m in records]
    gaps = np.diff(stamps)
    samples = int(records[0]["samples"])
    epoch_s = float(np.median(gaps))
    train_s = float(np.median([float(m["epoch_time_s"]) for m in records[1:]]))
    return {
        "images_per_s_epoch": round(samples / epoch_s, 2),
        "images_per_s_train_only": round(samples / train_s, 2),
        "epoch_s": round(epoch_s, 3), "epoch_gaps_s": [round(float(g), 3) for g in gaps],
        "train_only_s": round(train_s, 3), "samples_per_epoch": samples,
        "time_to_first_epoch_s": round(stamps[0] - started, 2), "wall_s": round(finished - started, 2),
        "final_val_accuracy": round(float(records[-1]["val_accuracy"]), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1500)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--width", type=int, default=8, help="ResNet width (first stage channels)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads = CPUs per worker")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs the benchmark's Ray head offers")
    parser.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    args = parser.parse_args()

    import pandas as pd
    import torch

    from flowops.ray_client import kill_session
    from flowops.task import load_task
    from flowops.train import TrainConfig, TrainingData, TrainPlan, loop_config

    task_options = {"size": args.size, "channels": 3, "width": args.width}
    task = load_task("flowops.tasks:resnet", task_options)
    classes = list(COLOURS)
    t0 = time.perf_counter()
    blobs, y = make_images(args.images)
    x = np.stack([task.decode(b) for b in blobs])
    prepare_s = time.perf_counter() - t0
    n_val = args.images // 10
    config = TrainConfig(task="flowops.tasks:resnet", task_options=task_options, epochs=args.epochs,
                         batch_size=args.batch_size, lr=args.lr, cpus_per_worker=args.threads)
    arrays = {"x_train": x[n_val:], "y_train": y[n_val:], "x_val": x[:n_val], "y_val": y[:n_val]}
    data = TrainingData(classes, pd.DataFrame(index=range(len(x) - n_val)), pd.DataFrame(index=range(n_val)))
    p = TrainPlan(config, None, data, None, task, "bench", None, None)
    print(f"{args.images} images decoded to {x.shape[1:]} in {prepare_s:.1f}s", flush=True)

    work = Path(tempfile.mkdtemp(prefix="fo-task-bench-", dir="/tmp"))
    sid = None
    runs: dict[str, list[dict]] = {"plain": [], "flowops_local": [], "ray_train_1_worker": []}
    load_start = os.getloadavg()[0]
    try:
        sid = start_ray(work, args.cpus, prefix="fo-tb")  # Ray reads its auth settings when first imported
        import ray

        def run_plain() -> list[dict]:
            return plain_loop(task, classes, *(arrays[k] for k in ("x_train", "y_train", "x_val", "y_val")),
                              epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                              seed=config.seed, threads=args.threads)

        def run_local(r: int) -> list[dict]:
            return flowops_local({**loop_config(p, "local", None, work / f"local-{r}"), **arrays})

        def run_ray(r: int) -> list[dict]:
            return ray_train(loop_config(p, "train", None, Path("/unused")), arrays, work / "train-runs",
                             f"bench-{r}", args.threads)

        variants = {"plain": lambda r: run_plain(), "flowops_local": run_local,
                    "ray_train_1_worker": run_ray}
        names = list(variants)
        for r in range(args.rounds):
            for name in names[r % 3:] + names[:r % 3]:
                started = time.time()
                records = variants[name](r)
                row = summary(records, started, time.time())
                runs[name].append(row)
                print(f"round {r + 1} {name:<20} {row['images_per_s_epoch']:7.1f} images/s per epoch "
                      f"({row['images_per_s_train_only']:.1f} training only), epoch gaps "
                      f"{row['epoch_gaps_s']}, val acc {row['final_val_accuracy']}", flush=True)
    finally:
        if "ray" in sys.modules and sys.modules["ray"].is_initialized():
            sys.modules["ray"].shutdown()
        if sid is not None:
            kill_session(sid)
        shutil.rmtree(work, ignore_errors=True)

    def paired(name: str, key: str) -> list[float]:
        return [round(v[key] / a[key], 3) for v, a in zip(runs[name], runs["plain"], strict=True)]

    medians = {name: {key: round(statistics.median(r[key] for r in rows), 2)
                      for key in ("images_per_s_epoch", "images_per_s_train_only", "epoch_s",
                                  "time_to_first_epoch_s")}
               for name, rows in runs.items()}
    ratios = {f"{name}_over_plain": {
        "per_epoch_rounds": paired(name, "images_per_s_epoch"),
        "per_epoch_median": statistics.median(paired(name, "images_per_s_epoch")),
        "train_only_rounds": paired(name, "images_per_s_train_only"),
        "train_only_median": statistics.median(paired(name, "images_per_s_train_only")),
    } for name in ("flowops_local", "ray_train_1_worker")}
    ratio = ratios["ray_train_1_worker_over_plain"]["per_epoch_median"]
    report = {
        "benchmark": "training throughput, ResNet task 64x64 RGB: plain PyTorch vs FlowOps local "
                     "vs Ray Train 1 worker",
        "config": {"images": args.images, "train_images": len(data.train), "val_images": n_val,
                   "task": "flowops.tasks:resnet", "task_options": task_options, "depth": [2, 2, 2],
                   "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                   "torch_threads": args.threads, "ray_cpus": args.cpus, "rounds": args.rounds},
        "medians": medians, "ratios": ratios,
        "goal": {"ray_train_1_worker_per_epoch_at_least": 0.95, "ratio": ratio, "met": ratio >= 0.95},
        "runs": runs,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "ray": ray.__version__,
                    "platform": platform.platform(), "load_avg_1m_at_start": round(load_start, 2),
                    "load_avg_1m_at_end": round(os.getloadavg()[0], 2)},
        "note": "2-core machine shared with other agents: compare the paired ratios of one run; "
                "epoch = gap between consecutive epoch ends, first epoch excluded, median per run",
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"medians": medians, "ratios": ratios, "goal": report["goal"]}, indent=2))


if __name__ == "__main__":
    main()
