"""Closed-loop serving benchmark: (a) the canary app through its router, (b) one bare model
deployment, (c) a plain single-process FastAPI + uvicorn server with the same model.

Each target gets a time-bounded run at concurrency 1 and 32 (one 8x8 digit per request, the same
JSON body everywhere); prints req/s, p50, p99 and the ratios, and writes serve_bench.json beside
this file. Needs a running stack (`flowops up`) with FLOWOPS_* pointing at it; registers a small
model as `production` if none exists. Only 127.0.0.1 is targeted.

    python tests/benchmarks/serve_bench.py [--duration 5] [--rounds 3] [--warmup 2]
    python tests/benchmarks/serve_bench.py --task resnet    # -> serve_bench_resnet.json

`--task resnet`: the built-in ResNet task (64x64 RGB, width 8, ImageNet normalisation) registered
as `bench-resnet` (stable and canary), each request one colour PNG of 48-96 px as base64, which
every target decodes and resizes with the model's `Preprocess`.
"""


import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


RESNET_MODEL = "bench-resnet"


def _body(task: str) -> bytes:
    if task == "resnet":
        import base64

        from task_bench import make_images  # this folder: the training bench's colour images

        blobs, _ = make_images(1, seed=3)
        return json.dumps({"instances": [{"b64": base64.b64encode(blobs[0]).decode()}]}).encode()
    from tests.integration.conftest_serving import digits_pixels

    pixels, _ = digits_pixels(1)
    return json.dumps({"instances": [pixels[0].tolist()]}).encode()


def _fitted(task: str, seed: int):
    """(task, network) to register: the digits small CNN fitted briefly, or an untrained ResNet
    task network (throughput does not depend on the weights)."""
    from tests.integration.conftest_serving import DIGITS, fit_classifier

    if task != "resnet":
        return fit_classifier(seed=seed)
    import torch

    from flowops.task import TaskSpec, load_task

    torch.manual_seed(seed)
    resnet = load_task(TaskSpec(path="flowops.tasks:resnet", options={"size": 64, "width": 8}))
    return resnet, resnet.build_model(DIGITS).eval()


async def _closed_loop(url: str, body: bytes, concurrency: int, duration: float,
                       warmup: float) -> dict:
    """`concurrency` clients, each sending its next request when the last one is answered.

    aiohttp (a Ray dependency) rather than httpx: the load generator shares the 2 cores with the
    servers, and aiohttp spends several times less CPU per request."""
    import aiohttp

    latencies: list[float] = []
    errors = 0
    headers = {"content-type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as client:
        start = time.perf_counter()
        measure_from = start + warmup
        stop = measure_from + duration

        async def worker() -> None:
            nonlocal errors
            while True:
                t0 = time.perf_counter()
                if t0 >= stop:
                    return
                try:
                    async with client.post(url, data=body, headers=headers) as resp:
                        await resp.read()
                        ok = resp.status == 200
                except Exception:  # noqa: BLE001 - counted, the run goes on
                    ok = False
                t1 = time.perf_counter()
                if t0 >= measure_from and t1 <= stop:
                    if ok:
                        latencies.append((t1 - t0) * 1000)
                    else:
                        errors += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    latencies.sort()
    n = len(latencies)
    pct = lambda q: round(latencies[min(n - 1, int(q * n))], 2) if n else None  # noqa: E731
    return {"concurrency": concurrency, "requests": n, "errors": errors,
            "req_per_s": round(n / duration, 1), "p50_ms": pct(0.50), "p99_ms": pct(0.99)}


def _median_run(rounds: list[dict]) -> dict:
    """The round with the median throughput, plus every round's req/s for the record."""
    ordered = sorted(rounds, key=lambda r: r["req_per_s"])
    return {**ordered[len(ordered) // 2], "rounds_req_per_s": [r["req_per_s"] for r in rounds]}


def _ensure_model(settings, task: str) -> str:
    from flowops.errors import NotFound
    from flowops.model import resolve_model_version
    from flowops.refs import ModelRef

    try:
        return resolve_model_version(settings, ModelRef.production(settings.model_name).uri)[1]
    except NotFound:
        from tests.integration.conftest_serving import register_version

        return register_version(settings, _fitted(task, 0), alias="production")


BODY_LIMIT = 4 * 1024 * 1024
MAX_INSTANCES = 64


def _predictions(model, version: str, probs) -> list[dict]:
    import numpy as np

    return [{"label": model.classes[int(np.argmax(p))], "score": float(np.max(p)),
             "probabilities": {c: float(x) for c, x in zip(model.classes, p, strict=True)},
             "model_version": version} for p in probs]


def _bare_deployment(model_uri: str, home: str | None, tracking_uri: str | None,
                     num_cpus: float = 0.2):
    """(b): one model deployment with the app's body parsing and batching but no routing, ledger
    or metrics. Defined in a function so that Serve pickles it by value (the replicas need not
    import this file)."""
    import asyncio

    import numpy as np
    from fastapi import Depends, FastAPI
    from fastapi.responses import JSONResponse
    from ray import serve

    from flowops.errors import FlowOpsError
    from flowops.serving.config import PredictRequest
    from flowops.serving.http import HttpPolicy, flowops_error, json_body

    bare_api = FastAPI(title="FlowOps bare model")
    bare_api.add_exception_handler(FlowOpsError, flowops_error)

    @serve.deployment(name="BareModel")
    @serve.ingress(bare_api)
    class BareModel:
        async def __init__(self, model_uri: str, home: str | None, tracking_uri: str | None):
            import torch

            from flowops.model import load_model
            from flowops.settings import get_settings

            torch.set_num_threads(1)
            settings = get_settings(home=home, mlflow_tracking_uri=tracking_uri)
            loaded = await asyncio.to_thread(load_model, settings, model_uri)
            self.model, self.version = loaded, loaded.version
            self.http = HttpPolicy(None, None, require_api_key=False, max_body_bytes=BODY_LIMIT)

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
        async def _infer(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
            from flowops.model import predict_proba, to_batch

            return list(predict_proba(self.model.model, to_batch(arrays)))

        @bare_api.post("/predict")
        async def predict(self, body: PredictRequest = Depends(json_body(PredictRequest))):
            arrays = body.images(MAX_INSTANCES).arrays(self.model.preprocess)
            probs = await asyncio.gather(*(self._infer(a) for a in arrays))
            return JSONResponse({"predictions": _predictions(self.model, self.version, probs)},
                                headers={"X-Model-Version": self.version})

    return BareModel.options(
        max_ongoing_requests=64,
        ray_actor_options={"num_cpus": num_cpus, "runtime_env": {"env_vars": {
            "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
            "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000", "OMP_NUM_THREADS": "1"}}},
        logging_config={"enable_access_log": False},
    ).bind(model_uri, home, tracking_uri)


def _plain_server(port: int) -> None:
    """(c): one process, FastAPI + uvicorn, the same model and preprocessing, no batching."""
    import torch
    import uvicorn
    from fastapi import Depends, FastAPI
    from fastapi.responses import JSONResponse

    from flowops.errors import FlowOpsError
    from flowops.model import load_model, predict_proba, to_batch
    from flowops.refs import ModelRef
    from flowops.serving.config import PredictRequest
    from flowops.serving.http import HttpPolicy, current_policy, flowops_error, json_body
    from flowops.settings import get_settings

    torch.set_num_threads(1)
    loaded = load_model(get_settings(), ModelRef.production(get_settings().model_name).uri)
    version = loaded.version
    app = FastAPI()
    app.add_exception_handler(FlowOpsError, flowops_error)
    policy = HttpPolicy(None, None, require_api_key=False, max_body_bytes=BODY_LIMIT)
    app.dependency_overrides[current_policy] = lambda: policy

    @app.post("/predict")
    async def predict(body: PredictRequest = Depends(json_body(PredictRequest))):
        arrays = body.images(MAX_INSTANCES).arrays(loaded.preprocess)
        probs = predict_proba(loaded.model, to_batch(arrays))
        return JSONResponse({"predictions": _predictions(loaded, version, probs)},
                            headers={"X-Model-Version": version})

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="Measured seconds per run.")
    parser.add_argument("--rounds", type=int, default=3, help="Interleaved rounds (median kept).")
    parser.add_argument("--warmup", type=float, default=2.0, help="Unmeasured seconds first.")
    parser.add_argument("--canary-weight", type=int, default=10, help="Canary share in (a).")
    parser.add_argument("--task", choices=("digits", "resnet"), default="digits")
    parser.add_argument("--plain-server", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.task == "resnet":  # its own registered model (the plain server inherits the name)
        os.environ["FLOWOPS_MODEL_NAME"] = RESNET_MODEL
    if args.plain_server:
        _plain_server(args.plain_server)
        return

    from flowops.durable import wait_until
    from flowops.ray_client import apply_ray_auth_env, connect, free_port
    from flowops.refs import ModelRef
    from flowops.settings import get_settings

    settings = get_settings()
    apply_ray_auth_env(settings)  # before Ray is imported

    import httpx
    import ray
    from ray import serve

    from flowops import serving

    version = _ensure_model(settings, args.task)
    canary = None
    if args.canary_weight:
        from tests.integration.conftest_serving import register_version

        canary = register_version(settings, _fitted(args.task, 1))
    serving.deploy(settings, stable=version, canary=canary, weight=args.canary_weight if canary else 0)
    connect(settings)
    serve.run(_bare_deployment(ModelRef.of(settings.model_name, version).uri, str(settings.home),
                               settings.tracking_uri), name="bench-bare", route_prefix="/bench-bare")

    port = free_port()
    plain = subprocess.Popen([sys.executable, __file__, "--plain-server", str(port)],
                             env={**os.environ}, start_new_session=True)
    body = _body(args.task)
    targets = {
        "router_app": f"{settings.serve_url}/predict",
        "bare_deployment": f"{settings.serve_url}/bench-bare/predict",
        "plain_fastapi": f"http://127.0.0.1:{port}/predict",
    }
    # The router app with its canary share set to 0 (same replicas, weight changed at runtime):
    # the routing/ledger/metrics overhead alone, apart from the cost of serving two models.
    weights = {"router_app": args.canary_weight if canary else 0}
    if canary:
        targets = {"router_app_no_canary": targets["router_app"], **targets}
        weights["router_app_no_canary"] = 0
    try:
        def plain_answers() -> bool:
            try:
                return httpx.post(targets["plain_fastapi"], content=body, timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(plain_answers, 120, what="the plain FastAPI server answering")
        # Interleaved rounds (every target at every concurrency once per round), then the median
        # round per cell: a noisy neighbour hurts one round of each target, not all of one target.
        runs: dict[tuple[str, int], list[dict]] = {}
        for rnd in range(1, args.rounds + 1):
            for c in (1, 32):
                for name, url in targets.items():
                    if name in weights and canary:
                        serving.set_weight(settings, weights[name])
                    r = asyncio.run(_closed_loop(url, body, c, args.duration, args.warmup))
                    runs.setdefault((name, c), []).append(r)
                    print(f"round {rnd} {name:16s} c={c:<3d} {r['req_per_s']:8.1f} req/s  "
                          f"p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms  errors {r['errors']}")
        results: dict[str, list[dict]] = {
            name: [_median_run(runs[(name, c)]) for c in (1, 32)] for name in targets
        }
        for name, rows in results.items():
            for r in rows:
                print(f"median {name:16s} c={r['concurrency']:<3d} {r['req_per_s']:8.1f} req/s  "
                      f"p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms  errors {r['errors']}")
    finally:
        plain.terminate()
        plain.wait(timeout=30)
        serve.delete("bench-bare")

    def rps(name: str, i: int) -> float:
        return results[name][i]["req_per_s"] or 1e-9

    ratios = {
        f"router_over_bare_c{c}": round(rps("router_app", i) / rps("bare_deployment", i), 3)
        for i, c in enumerate((1, 32))
    } | ({
        f"router_no_canary_over_bare_c{c}":
            round(rps("router_app_no_canary", i) / rps("bare_deployment", i), 3)
        for i, c in enumerate((1, 32))
    } if "router_app_no_canary" in results else {}) | {
        f"router_over_plain_c{c}": round(rps("router_app", i) / rps("plain_fastapi", i), 3)
        for i, c in enumerate((1, 32))
    }
    print(json.dumps(ratios, indent=2))
    out = {
        "task": args.task, "model": settings.model_name,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "ray": ray.__version__},
        "duration_s": args.duration, "warmup_s": args.warmup, "rounds": args.rounds,
        "serve_fast_path": settings.serve_fast_path, "canary_weight": args.canary_weight,
        "results": results, "ratios": ratios,
        "goals": {"router_overhead_vs_bare_at_most": 0.05, "serve_vs_plain_c32_at_least": 0.5,
                  "p99_c32_ms_under": 100},
        "note": "2-core machine; load generator (aiohttp) on the same cores as the servers; "
                "median of interleaved rounds",
    }
    name = "serve_bench_resnet.json" if args.task == "resnet" else "serve_bench.json"
    (Path(__file__).parent / name).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
