"""GPU check: torchvision/timm backbones as FlowOps tasks (the optional `vision` extra), trained
with FlowOps's loop in bf16 with the backbone frozen for the first epoch, then exported as a
registered version's network is. Run on a GPU machine that has torchvision and timm (PyPI's
torchvision does not import beside this project's CPU torch 2.13):

    PYTHONPATH=platform python3 tests/benchmarks/vision_gpu_check.py OUT.json

Result of the last run: vision_gpu_check.json beside this file (an H200: both backbones reach
validation accuracy 1.0 on colour classes by epoch 3; the export matches the module).
"""
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from flowops.model import export_network
from flowops.task import TaskSpec, load_task
from flowops.train_session import train_loop

out = {}
rng = np.random.default_rng(0)
n = 2048
y = rng.integers(0, 3, n).astype(np.int64)
x = rng.normal(0, 0.5, (n, 3, 96, 96)).astype(np.float32)
for c in range(3):
    x[y == c, c] += 1.0
for spec in ({"path": "flowops.tasks:torchvision_model", "options": {"arch": "resnet18", "size": 96}},
             {"path": "flowops.tasks:timm_model", "options": {"name": "resnet18", "size": 96}},
             {"path": "flowops.tasks:torchvision_model", "options": {"arch": "nosuch"}}):
    key = f"{spec['path']}:{spec['options'].get('arch') or spec['options'].get('name')}"
    try:
        task = load_task(TaskSpec(**spec))
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            train_loop({"mode": "local", "seed": 0, "epochs": 3, "batch_size": 128, "lr": 1e-3,
                        "freeze_epochs": 1, "classes": ["r", "g", "b"], "precision": "bf16", "task": spec,
                        "init_state": None, "x_train": x, "y_train": y, "x_val": x[:256], "y_val": y[:256],
                        "threads": 8, "fault_marker": None, "mlflow": None, "checkpoint_dir": tmp})
            reports = [json.loads(line) for line in Path(tmp, "metrics.jsonl").read_text().splitlines()]
        model = task.build_model(["r", "g", "b"]).eval()
        feats = task.features(model, torch.zeros(2, 3, 96, 96)).shape
        ep = export_network(model, task.preprocess)
        probe = torch.ones(3, 3, 96, 96)
        same = torch.allclose(ep.module()(probe), model(probe), atol=1e-4)
        out[key] = {"val_accuracy": [r["val_accuracy"] for r in reports],
                    "images_per_s": [round(r["images_per_s"]) for r in reports],
                    "head": task.head_prefix(model), "features": list(feats), "export_matches": bool(same),
                    "wall_s": round(time.perf_counter() - t, 1)}
    except Exception as exc:
        out[key] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    print(key, out[key], flush=True)
Path(sys.argv[1]).write_text(json.dumps(out, indent=2))
