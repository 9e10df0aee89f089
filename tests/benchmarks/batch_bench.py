"""Benchmark: the same model over the same 50,000+ image files, (a) a plain single-process PyTorch
loop and (b) the Ray Data pipeline of `flowops pseudo-label` with 1 and 2 model actors.

    .venv/bin/python tests/benchmarks/batch_bench.py [--images 50000] [--cpus 2] [--rounds 2]
    .venv/bin/python tests/benchmarks/batch_bench.py --task resnet   # -> batch_bench_resnet.json

`--task digits` (default): the small CNN on 8x8 augmented digits. `--task resnet`: the built-in
ResNet task (64x64 RGB, ImageNet normalisation, width 8) on synthetic colour PNGs of 48-96 px
(task_bench.py's images), 12,000 by default; the plain loop decodes with the model's
`Preprocess` (Pillow: open, EXIF, convert, resize, normalise) as the pipeline does.

Starts its own platform (`flowops up` without Serve in a temp home, free ports: a Ray head with
--cpus CPUs and the MLflow server the model is registered in and the actors load it from), writes
the images once (augmented digits, one PNG each, read by a manifest), then runs the variants interleaved
`--rounds` times (other work shares the CPU: compare the ratios of one run, not absolute rates)
and writes batch_bench.json beside this file. Both paths include reading the files, decoding,
inference and writing predictions.parquet with the same writer.
"""

from __future__ import annotations

import argparse
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
import pandas as pd
from bench_ray import start_platform, stop_platform

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "platform"))


def make_images(root: Path, count: int, task: str = "digits") -> pd.DataFrame:
    if task == "resnet":
        from task_bench import make_images as colour_pngs  # this folder: the training bench's images

        blobs, _ = colour_pngs(count)
        for i, blob in enumerate(blobs):
            rel = f"images/{i // 1000:04d}/b{i:07d}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(blob)
        return pd.DataFrame([(f"b{i:07d}", f"images/{i // 1000:04d}/b{i:07d}.png")
                             for i in range(count)], columns=["id", "path"])
    from sklearn.datasets import load_digits

    from flowops.synth import SynthConfig, _png, augment

    digits = load_digits()
    pixels = np.clip(np.round(digits.images * (255 / 16)), 0, 255).astype(np.uint8)
    rng = np.random.default_rng(0)
    cfg = SynthConfig(count=count)
    rows = []
    for i in range(count):
        rel = f"images/{i // 1000:04d}/b{i:07d}.png"
        if i % 1000 == 0:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(_png(augment(pixels[i % len(pixels)], rng, cfg)))
        rows.append((f"b{i:07d}", rel))
    return pd.DataFrame(rows, columns=["id", "path"])


def fit_model(settings, task_name: str = "digits", width: int = 8):
    """The task's network fitted briefly (digits: the small CNN; resnet: the ResNet task on 64x64
    colour images), registered in the benchmark platform's MLflow server, where the Ray Data actors
    load it from: (loaded model, its models:/ URI)."""
    import torch

    from flowops.model import load_model, log_model_version
    from flowops.refs import ModelRef
    from flowops.task import TaskSpec, load_task
    from flowops.tracking import start_run

    torch.manual_seed(0)
    if task_name == "resnet":
        from task_bench import COLOURS
        from task_bench import make_images as colour_pngs

        task = load_task(TaskSpec(path="flowops.tasks:resnet",
                                  options={"size": 64, "channels": 3, "width": width}))
        classes = list(COLOURS)
        blobs, labels = colour_pngs(256, seed=1)
        x = torch.from_numpy(np.stack([task.decode(b) for b in blobs]))
        y = torch.from_numpy(labels)
        steps = 8
    else:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
        y = torch.tensor(digits.target)
        task, classes = load_task(TaskSpec()), [str(c) for c in range(10)]
        steps = 40
    net = task.build_model(classes)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    with start_run(settings, "batch-bench", run_name="fit"):
        version = log_model_version(settings, net.eval(), task, classes, registered_name="bench")
    uri = ModelRef.of("bench", version).uri
    return load_model(settings, uri), uri


def plain_batches(rows: pd.DataFrame, root: Path, loaded, batch_size: int):
    """The baseline: one process reads, decodes (the model's preprocessing) and scores the files
    in batches."""
    from flowops.model import predict_proba, to_batch

    pre = loaded.preprocess
    for start in range(0, len(rows), batch_size):
        chunk = rows.iloc[start : start + batch_size]
        arrays, errors = [], []
        for rel in chunk["path"]:
            try:
                arrays.append(pre.decode((root / rel).read_bytes()))
                errors.append("")
            except Exception as exc:  # noqa: BLE001
                arrays.append(np.zeros(pre.shape, np.float32))
                errors.append(str(exc))
        yield {"id": chunk["id"].to_numpy(object), "error": np.asarray(errors, dtype=object),
               "probabilities": predict_proba(loaded.model, to_batch(arrays))}


def timed(fn) -> tuple[float, int]:
    started = time.perf_counter()
    n = fn()
    return time.perf_counter() - started, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--task", choices=("digits", "resnet"), default="digits")
    parser.add_argument("--images", type=int, help="default: 50,000 digits, 12,000 colour images")
    parser.add_argument("--width", type=int, default=8, help="ResNet width (--task resnet)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs the benchmark's Ray head offers")
    parser.add_argument("--batch-size", type=int, help="default: 1024 digits, 256 colour images")
    parser.add_argument("--rounds", type=int, help="default: 2 digits, 3 colour images")
    parser.add_argument("--out", help="default: batch_bench.json (digits), batch_bench_resnet.json")
    args = parser.parse_args()
    resnet = args.task == "resnet"
    args.images = args.images or (12_000 if resnet else 50_000)
    args.batch_size = args.batch_size or (256 if resnet else 1024)
    args.rounds = args.rounds or (3 if resnet else 2)
    here = Path(__file__).parent
    args.out = args.out or str(here / ("batch_bench_resnet.json" if resnet else "batch_bench.json"))

    import torch

    from flowops import pseudo_label as pl

    work = Path(tempfile.mkdtemp(prefix="fo-batch-bench-", dir="/tmp"))
    settings = None
    try:
        t0 = time.perf_counter()
        rows = make_images(work / "data", args.images, args.task)
        write_s = time.perf_counter() - t0
        print(f"wrote {len(rows)} PNG files in {write_s:.1f}s", flush=True)
        settings = start_platform(work, args.cpus)
        loaded, model_uri = fit_model(settings, args.task, args.width)
        import ray

        classes = loaded.classes
        root = work / "data"

        def run_plain() -> int:
            tally = pl.write_predictions(plain_batches(rows, root, loaded, args.batch_size),
                                         classes, "bench", "bench", work / "out-plain")
            return tally.scored

        def run_ray(actors: int) -> int:
            """As `flowops pseudo-label` runs on a folder version: the driver reads the files
            into Arrow blocks (`images.dataset`), Ray tasks decode, actors score."""
            import pyarrow as pa

            cfg = pl.PseudoLabelConfig(batch_size=args.batch_size, actors=actors,
                                       cpus_per_actor=min(1.0, args.cpus / actors))
            blocks = [pa.table({"id": list(chunk["id"]),
                                "bytes": pa.array([(root / p).read_bytes() for p in chunk["path"]],
                                                  pa.binary())})
                      for chunk in (rows.iloc[i:i + 1000] for i in range(0, len(rows), 1000))]
            batches = pl.score_batches(settings, ray.data.from_arrow(blocks), model_uri,
                                       loaded.preprocess, cfg)
            tally = pl.write_predictions(batches, classes, "bench", "bench", work / f"out-ray{actors}")
            return tally.scored

        variants = {"plain": run_plain, "ray_data_1_actor": lambda: run_ray(1),
                    "ray_data_2_actors": lambda: run_ray(2)}
        timings: dict[str, list[float]] = {k: [] for k in variants}
        run_ray(1)  # warm-up: worker processes, imports (not timed)
        for r in range(args.rounds):
            for name, fn in variants.items():
                seconds, n = timed(fn)
                assert n == len(rows), (name, n)
                timings[name].append(seconds)
                print(f"round {r + 1} {name:<18} {seconds:6.2f}s {n / seconds:8.0f} images/s",
                      flush=True)
        best = {k: min(v) for k, v in timings.items()}
        rate = {k: round(len(rows) / s, 1) for k, s in best.items()}
        # also medians, and ratios paired round by round (the variants of one round saw the
        # same neighbours)
        median_rate = {k: round(len(rows) / statistics.median(v), 1) for k, v in timings.items()}
        paired = {f"{k}_vs_plain": [round(p / s, 3) for s, p in zip(v, timings["plain"], strict=True)]
                  for k, v in timings.items() if k != "plain"}
        plain_preds = pd.read_parquet(work / "out-plain" / "predictions.parquet")
        ray_preds = pd.read_parquet(work / "out-ray2" / "predictions.parquet")
        same = (plain_preds.set_index("id")["label"]
                == ray_preds.set_index("id")["label"].reindex(plain_preds["id"])).mean()
        report = {
            "benchmark": "batch pseudo-labeling: plain PyTorch loop vs Ray Data actor pool",
            "task": str(loaded.task.spec), "images": len(rows), "batch_size": args.batch_size,
            "ray_cpus": args.cpus,
            "rounds": args.rounds, "seconds": {k: [round(s, 3) for s in v]
                                               for k, v in timings.items()},
            "images_per_s_best": rate, "images_per_s_median": median_rate,
            "paired_ratios": paired,
            "paired_ratio_medians": {k: statistics.median(v) for k, v in paired.items()},
            "ratio_ray_1_actor_vs_plain": round(rate["ray_data_1_actor"] / rate["plain"], 3),
            "ratio_ray_2_actors_vs_plain": round(rate["ray_data_2_actors"] / rate["plain"], 3),
            "scaling_2_vs_1_actor": round(rate["ray_data_2_actors"] / rate["ray_data_1_actor"], 3),
            "goal": "ray_data >= 0.9 x plain on one 2-core machine",
            "goal_met": max(rate["ray_data_1_actor"], rate["ray_data_2_actors"])
            >= 0.9 * rate["plain"],
            "same_predictions_share": round(float(same), 4),
            "write_images_s": round(write_s, 1),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "torch": torch.__version__, "ray": ray.__version__,
                        "torch_threads_plain": torch.get_num_threads(),
                        "load_avg_1m_at_end": round(os.getloadavg()[0], 2)},
            "note": "CPU shared with other work; ratios of one interleaved run, best of rounds",
        }
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))
    finally:
        if settings is not None:
            stop_platform(settings)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
