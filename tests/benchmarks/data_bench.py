"""Benchmark: today's folder-of-files data versions vs images in Parquet shards, side by side.

    flock /tmp/flowops-it.lock .venv/bin/python tests/benchmarks/data_bench.py \
        [--sizes 10000 100000] [--rounds 3]

For each size: the same synthetic small PNGs (written once, cached in /tmp between runs) become a
folder version (`data.init_dataset`, today's `flowops data init --from`) and a sharded version
(`shard_import.import_images`, `flowops data import`), each in its own home. Then, in interleaved
rounds (medians reported):

- snapshot: cut a label snapshot of 100 labels from the unlabeled pool: `data.cut_version` with
  the loop's edit (files moved, the folder re-added to DVC and pushed) vs `shards.cut_labels`
  (the manifest rewritten; goal: flat in size, < 5 s at 10^5);
- open + stream: open the imported version (v1) and read every image's bytes: the folder
  version materialized through DVC (cold in the first --cold-rounds rounds) then its files read,
  vs the sharded version opened (cold) and streamed through Ray Data (`shards.read_version`, on
  a Ray head of --cpus CPUs started here), vs the same Parquet shards read with pyarrow directly
  (goal: Ray Data >= 0.9x pyarrow), each also with every image decoded (what a workload does);
  the fixed cost of an empty Ray Data pipeline of as many blocks is recorded beside them;
- storage bytes per image of both layouts (the DVC remote's files; the shards and a manifest).

Writes data_bench.json beside this file.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import bench_ray
import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "platform"))
sys.path.insert(0, str(REPO))

CACHE = Path("/tmp/flowops-data-bench")
CLASSES = [str(c) for c in range(10)]


def make_images(count: int) -> Path:
    """`count` small PNGs (noisy 16x16 digits-like patterns), 10 class folders; cached."""
    root = CACHE / f"images-{count}"
    if (root / ".done").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(count)
    for c in CLASSES:
        (root / c).mkdir(parents=True)
    for i in range(count):
        d = i % len(digits.images)
        pixels = np.kron(digits.images[d] * 15, np.ones((2, 2))) + rng.normal(0, 8, (16, 16))
        img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="L")
        img.save(root / str(digits.target[d]) / f"{i:07d}.png", optimize=False)
    (root / ".done").write_text("")
    return root


def disk_bytes(root: Path) -> tuple[int, int]:
    """(apparent bytes, bytes on disk in blocks) of every file under root."""
    apparent = blocks = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            st = os.lstat(os.path.join(dirpath, name))
            apparent += st.st_size
            blocks += st.st_blocks * 512
    return apparent, blocks


def timed(fn):
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value


def decode_all(payloads) -> int:
    from PIL import Image

    n = 0
    for payload in payloads:
        with Image.open(io.BytesIO(payload)) as img:
            img.load()
        n += 1
    return n


def start_ray(work: Path, cpus: int) -> int:
    import ray

    sid = bench_ray.start_ray(work, cpus, prefix="fo-db")
    ray.data.DataContext.get_current().enable_progress_bars = False
    return sid


def bench_size(n: int, rounds: int, cold_rounds: int, work: Path) -> dict:
    import pandas as pd
    import pyarrow.parquet as pq
    import ray

    from flowops import data, shard_import, shards, storage
    from flowops.loop.stages import _apply_labels  # what the loop's snapshot does today
    from flowops.settings import get_settings

    images = make_images(n)
    folder = get_settings(home=work / f"folder-{n}")
    sharded = get_settings(home=work / f"shards-{n}")
    init_folder_s, folder_info = timed(lambda: data.init_dataset(folder, images,
                                                                 unlabeled_fraction=0.5))
    print(f"[{n}] folder version {folder_info.id} in {init_folder_s:.1f}s", flush=True)
    import_s, result = timed(lambda: shard_import.import_images(sharded, str(images),
                                                               unlabeled_fraction=0.5))
    print(f"[{n}] sharded version {result.version} in {import_s:.1f}s "
          f"({result.shards} shards)", flush=True)
    store = storage.open_storage(sharded)
    # Storage right after creation (one manifest each): the DVC remote's files vs shards + manifest.
    remote_apparent, remote_disk = disk_bytes(Path(folder.remote))
    shard_apparent, shard_disk = disk_bytes(Path(store.path(shards.IMAGES)))
    manifest_bytes = (sharded.workspace / data.DATA_DIR / "manifest.csv").stat().st_size
    answers = {layout: pd.read_csv(s.workspace / data.DATA_DIR / "answers.csv", dtype=str)
               for layout, s in (("folder", folder), ("shards", sharded))}

    def snapshot(layout: str, r: int) -> float:
        chosen = dict(answers[layout].iloc[r * 100:(r + 1) * 100].itertuples(index=False))
        if layout == "folder":
            fn = lambda: data.cut_version(folder, f"bench {r}", _apply_labels(chosen, CLASSES))  # noqa: E731
        else:
            fn = lambda: shards.cut_labels(sharded, chosen, f"bench {r}", store)  # noqa: E731
        assert len(chosen) == 100
        seconds, _ = timed(fn)
        return seconds

    def open_folder(cold: bool) -> data.DataVersion:
        if cold:  # nothing fetched: the version is materialized through DVC
            shutil.rmtree(folder.cache_dir / "data", ignore_errors=True)
        version = data.open_version(folder, "v1")  # the imported version, whatever was cut since
        assert version.root.is_dir()
        return version

    def open_sharded() -> data.DataVersion:
        shutil.rmtree(sharded.cache_dir / "data", ignore_errors=True)  # always cold: it is cheap
        return shards.open_manifest(sharded, "v1")

    def folder_read(version: data.DataVersion, decode: bool) -> int:
        payloads = ((version.root / rel).read_bytes() for rel in version.manifest.path)
        return decode_all(payloads) if decode else sum(1 for _ in payloads)

    def ray_read(version: data.DataVersion, decode: bool) -> int:
        ds = shards.read_version(version, store)
        if decode:
            ds = ds.map_batches(lambda b: {"n": np.array([decode_all(b["bytes"])])},
                                batch_format="numpy", batch_size=None)
            return sum(int(b["n"].sum()) for b in ds.iter_batches(batch_size=None))
        return sum(len(b["id"]) for b in ds.iter_batches(batch_size=None, batch_format="pyarrow"))

    def pyarrow_read(version: data.DataVersion, decode: bool) -> int:
        count = 0
        for name in sorted(set(version.manifest.shard)):
            table = pq.read_table(store.path(shards.shard_path(name)), columns=["id", "bytes"])
            count += decode_all(table["bytes"].to_pylist()) if decode else table.num_rows
        return count

    def streams(r: int) -> dict[str, float]:
        """Open each layout once, then read every image raw and decoded (fixed order per
        round, reversed every other round)."""
        out = {}
        cold = r < cold_rounds
        open_s, fv = timed(lambda: open_folder(cold))
        out["open_folder_cold" if cold else "open_folder_warm"] = open_s
        out["open_shards"], sv = timed(open_sharded)
        readers = [("folder_files", folder_read, fv), ("shards_ray_data", ray_read, sv),
                   ("shards_pyarrow", pyarrow_read, sv)]
        for name, read, version in readers if r % 2 == 0 else readers[::-1]:
            for decode in (False, True):
                seconds, count = timed(lambda: read(version, decode))  # noqa: B023
                assert count == len(version.manifest), (name, count)
                out[f"stream_{name}{'_decode' if decode else ''}"] = seconds
        return out

    ray_read(open_sharded(), False)  # warm-up: Ray Data's workers and imports (not timed)
    overhead_s, _ = timed(lambda: ray.data.range(result.shards, override_num_blocks=result.shards)
                          .map_batches(lambda b: b).materialize())
    t: dict[str, list[float]] = {}
    for r in range(rounds):
        order = ["folder", "shards"] if r % 2 == 0 else ["shards", "folder"]
        for layout in order:
            t.setdefault(f"snapshot_{layout}", []).append(snapshot(layout, r))
        for key, seconds in streams(r).items():
            t.setdefault(key, []).append(seconds)
        print(f"[{n}] round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in t.items()),
              flush=True)
    med = {k: round(statistics.median(v), 3) for k, v in t.items()}
    rate = {k.removeprefix("stream_"): round(n / v, 1) for k, v in med.items()
            if k.startswith("stream_")}
    return {
        "images": n, "rejected": result.rejected, "shards": result.shards, "rounds": rounds,
        "create_version_s": {"folder_init": round(init_folder_s, 1),
                             "shards_import": round(import_s, 1)},
        "seconds_median": med,
        "seconds_rounds": {k: [round(x, 3) for x in v] for k, v in t.items()},
        "images_per_s_median": rate,
        "ratio_ray_data_vs_pyarrow": round(rate["shards_ray_data"] / rate["shards_pyarrow"], 3),
        "ratio_ray_data_vs_pyarrow_decode": round(
            rate["shards_ray_data_decode"] / rate["shards_pyarrow_decode"], 3),
        "ray_data_fixed_overhead_s": round(overhead_s, 3),
        "ratio_snapshot_folder_vs_shards": round(med["snapshot_folder"] / med["snapshot_shards"], 1),
        "bytes_per_image": {
            "folder_dvc_remote_apparent": round(remote_apparent / n, 1),
            "folder_dvc_remote_on_disk": round(remote_disk / n, 1),
            "shards_and_manifest_apparent": round((shard_apparent + manifest_bytes) / n, 1),
            "shards_and_manifest_on_disk": round((shard_disk + manifest_bytes) / n, 1),
            "of_which_manifest_csv": round(manifest_bytes / n, 1),
            "image_file_mean": round(disk_bytes(images)[0] / n, 1),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cold-rounds", type=int, default=1,
                        help="rounds that open the folder version v1 cold (a DVC materialization: "
                             "minutes at 10^5); later rounds reuse its local copy")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs the benchmark's Ray head offers")
    parser.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    args = parser.parse_args()

    from flowops.ray_client import kill_session

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout`: clean up Ray below
    work = Path(tempfile.mkdtemp(prefix="fo-data-bench-", dir="/tmp"))
    sid = None
    started = time.perf_counter()
    try:
        sid = start_ray(work, args.cpus)
        results = [bench_size(n, args.rounds, args.cold_rounds, work) for n in args.sizes]
        largest = results[-1]
        import ray

        report = {
            "benchmark": "data versions: folder of files (today) vs Parquet shards + manifest",
            "sizes": results,
            "goals": {
                "snapshot_shards_flat_and_under_5s_at_largest":
                    largest["seconds_median"]["snapshot_shards"] < 5.0,
                "ray_data_at_least_0.9x_pyarrow_at_largest":
                    largest["ratio_ray_data_vs_pyarrow"] >= 0.9,
                "ray_data_at_least_0.9x_pyarrow_decode_at_largest":
                    largest["ratio_ray_data_vs_pyarrow_decode"] >= 0.9,
            },
            "run_s": round(time.perf_counter() - started, 1),
            "machine": {"cpus": os.cpu_count(), "ray_cpus": args.cpus,
                        "python": platform.python_version(), "ray": ray.__version__,
                        "load_avg_1m_at_end": round(os.getloadavg()[0], 2)},
            "note": "CPU shared with other work; medians of interleaved rounds; local disk "
                    "storage (the DVC remote and the storage URI are folders)",
        }
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))
    finally:
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        except Exception:  # noqa: BLE001
            pass
        if sid is not None:
            kill_session(sid)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
