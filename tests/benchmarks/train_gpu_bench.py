"""Benchmark (GPU): the ResNet-style task at 64x64 RGB, FlowOps's loop in fp32 and bf16 against an
engineer's plain PyTorch loop, with the GPU's utilisation while each runs.

Variants, interleaved round by round on the same preprocessed tensors, batch size and model:
  plain_fp32     the loop an engineer writes: DataLoader over a TensorDataset, Adam, cross-entropy
  flowops_fp32   FlowOps's `train_loop` (the task's `fit` through a TaskContext), --precision fp32
  flowops_bf16   the same, --precision bf16 (autocast), channels-last
  resident_bf16  an upper bound: the whole training set on the GPU, bf16, channels-last, no loader
Throughput is images/s of the steady epochs (the first epoch of each run is left out: cudnn
autotuning, allocator warm-up); ratios are paired within a round. GPU utilisation is sampled with
NVML every 20 ms while a variant runs.

    python tests/benchmarks/train_gpu_bench.py [--n 16384] [--epochs 4] [--rounds 3] [--out F]

It needs torch, numpy, Pillow and pydantic, not Ray or MLflow (the loop runs in-process), so it runs
on a bare GPU machine. Written JSON: train_gpu_bench.json beside this file (or --out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
TASK = {"path": "flowops.tasks:resnet", "options": {"size": 64, "channels": 3, "width": 32}}


def synthetic(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Preprocessed colour images whose class is their dominant colour, plus noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n).astype(np.int64)
    x = rng.normal(0, 0.5, (n, 3, 64, 64)).astype(np.float32)
    for c in range(3):
        x[y == c, c] += 1.0
    return x, y


class GpuSampler:
    """Mean GPU utilisation (%) between start and stop, from NVML."""

    def __init__(self):
        self.samples: list[int] = []
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._nvml = pynvml
        except Exception:  # noqa: BLE001 - no NVML: no utilisation figure
            self._nvml = None

    def __enter__(self):
        if self._nvml is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.02):
            self.samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)

    def __exit__(self, *exc):
        self._stop.set()

    @property
    def mean(self) -> float | None:
        return round(statistics.fmean(self.samples), 1) if self.samples else None


def plain(x, y, epochs, batch_size, lr, resident: bool, bf16: bool) -> list[float]:
    """The engineer's loop; returns images/s per epoch."""
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from flowops.task import TaskSpec, load_task

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_task(TaskSpec(**TASK)).build_model(["r", "g", "b", "n"]).to(device)
    if resident:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    rates = []
    if resident:
        xs = torch.from_numpy(x).to(device).contiguous(memory_format=torch.channels_last)
        ys = torch.from_numpy(y).to(device)
    else:
        loader = DataLoader(TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=batch_size,
                            shuffle=True, pin_memory=device.type == "cuda")
    for _ in range(epochs):
        started = time.perf_counter()
        model.train()
        if resident:
            order = torch.randperm(len(ys), device=device)
            batches = ((xs[order[i:i + batch_size]], ys[order[i:i + batch_size]])
                       for i in range(0, len(ys), batch_size))
        else:
            batches = ((xb.to(device, non_blocking=True), yb.to(device, non_blocking=True))
                       for xb, yb in loader)
        for xb, yb in batches:
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = loss_fn(model(xb), yb)
            loss.backward()
            optimizer.step()
        loss.item()  # wait for the GPU
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(len(y) / (time.perf_counter() - started))
    return rates


def flowops(x, y, epochs, batch_size, lr, precision: str) -> list[float]:
    """FlowOps's loop in this process; returns images/s per epoch from its epoch reports."""
    from flowops.train_session import train_loop

    with tempfile.TemporaryDirectory() as tmp:
        n_val = 512
        train_loop({
            "mode": "local", "seed": 0, "epochs": epochs, "batch_size": batch_size, "lr": lr,
            "freeze_epochs": 0, "classes": ["r", "g", "b", "n"], "precision": precision,
            "task": TASK, "init_state": None, "x_train": x, "y_train": y,
            "x_val": x[:n_val], "y_val": y[:n_val], "threads": 8, "fault_marker": None,
            "mlflow": None, "checkpoint_dir": tmp,
        })
        reports = [json.loads(line) for line in Path(tmp, "metrics.jsonl").read_text().splitlines()]
    return [r["samples"] / r["epoch_time_s"] for r in sorted(reports, key=lambda r: r["epoch"])]


VARIANTS = {
    "plain_fp32": lambda a: plain(*a, resident=False, bf16=False),
    "flowops_fp32": lambda a: flowops(*a, precision="fp32"),
    "flowops_bf16": lambda a: flowops(*a, precision="bf16"),
    "resident_bf16": lambda a: plain(*a, resident=True, bf16=True),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out", type=Path, default=HERE / "train_gpu_bench.json")
    args = parser.parse_args()
    x, y = synthetic(args.n)
    work = (x, y, args.epochs, args.batch_size, 1e-3)
    rounds = []
    for r in range(args.rounds):
        row = {}
        for name, run in VARIANTS.items():
            with GpuSampler() as gpu:
                rates = run(work)
            row[name] = {"images_per_s": statistics.median(rates[1:] or rates), "gpu_util_pct": gpu.mean}
            print(f"round {r} {name}: {row[name]['images_per_s']:.0f} images/s, GPU {gpu.mean}%", flush=True)
        rounds.append(row)
    base = "plain_fp32"
    summary = {
        name: {
            "median_images_per_s": round(statistics.median(r[name]["images_per_s"] for r in rounds), 1),
            "median_ratio_to_plain_fp32": round(statistics.median(
                r[name]["images_per_s"] / r[base]["images_per_s"] for r in rounds), 3),
            "median_gpu_util_pct": statistics.median(
                [r[name]["gpu_util_pct"] for r in rounds if r[name]["gpu_util_pct"] is not None] or [0]),
        } for name in VARIANTS
    }
    summary["bf16_speedup_over_fp32"] = round(statistics.median(
        r["flowops_bf16"]["images_per_s"] / r["flowops_fp32"]["images_per_s"] for r in rounds), 3)
    result = {
        "benchmark": "train_gpu_bench", "task": TASK, "n_images": args.n, "epochs": args.epochs,
        "batch_size": args.batch_size, "rounds": args.rounds,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__, "summary": summary, "per_round": rounds,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
