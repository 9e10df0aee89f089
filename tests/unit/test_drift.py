"""Drift detection on real digits with a briefly trained small CNN (the digits task; no cluster).

Measured here (and quoted in docs/observability.md): the false-alarm rate over 100 fresh unshifted
windows of 100 images, and the detection power on inverted and noisy windows.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from flowops import drift, drift_monitor
from flowops.errors import InvalidInput
from flowops.image_model import Preprocess
from flowops.model import LoadedModel, to_batch
from flowops.settings import get_settings
from flowops.tasks import resnet, small_cnn
from tests.s3_server import s3_endpoint  # noqa: F401 - the fixture

WINDOW = 100
CLASSES = [str(i) for i in range(10)]
DIGITS = Preprocess(size=8, channels=1)


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (np.round(d.images * 255 / 16) / 255).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(images))
    train, pool = order[:1000], order[1000:]  # reference = training data; windows = unseen images
    return images, d.target, train, pool


@pytest.fixture(scope="module")
def trained(digits):
    images, target, train, pool = digits
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    task = small_cnn()
    model = task.build_model(CLASSES)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    x, y = to_batch(images[train][:, None]), torch.from_numpy(target[train]).long()
    for _ in range(3):  # ~30 steps: a usable model (~85% accuracy) in a few seconds
        model.train()
        for start in range(0, len(train), 100):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[start:start + 100]), y[start:start + 100]).backward()
            opt.step()
    model.eval()
    accuracy = (model(to_batch(images[pool][:, None])).argmax(1).numpy() == target[pool]).mean()
    print(f"\nreference model accuracy on unseen digits: {accuracy:.1%}")
    loaded = LoadedModel(model=model, task=task, classes=CLASSES, name="digits", version="1", uri="")
    reference = drift.build_reference(images[train], CLASSES, model=loaded, labels=target[train])
    yield loaded, reference
    torch.set_num_threads(threads)


def _rate(digits, trained, transform, trials: int, seed: int) -> float:
    images, _, _, pool = digits
    model, reference = trained
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(trials):
        window = transform(images[rng.choice(pool, WINDOW, replace=False)], rng)
        hits += drift.check_window(reference, window, model=model).drifted
    return hits / trials


def test_false_alarm_rate_on_fresh_unshifted_windows_is_at_most_5_percent(digits, trained):
    rate = _rate(digits, trained, lambda w, rng: w, trials=100, seed=1)
    print(f"\nfalse-alarm rate over 100 unshifted windows of {WINDOW}: {rate:.2%}")
    assert rate <= 0.05


@pytest.mark.parametrize(
    ("shift", "transform", "min_power"),
    [
        ("inverted", lambda w, rng: 1.0 - w, 1.0),
        ("gaussian noise sd 0.2", lambda w, rng: np.clip(w + rng.normal(0, 0.2, w.shape), 0, 1), 0.95),
        ("gaussian noise sd 0.1", lambda w, rng: np.clip(w + rng.normal(0, 0.1, w.shape), 0, 1), 0.9),
        ("dimmed to 80%", lambda w, rng: w * 0.8, 0.9),
    ],
)
def test_shifted_windows_are_flagged(digits, trained, shift, transform, min_power):
    power = _rate(digits, trained, lambda w, rng: transform(w, rng).astype(np.float32), trials=20, seed=2)
    print(f"\ndetection power, {shift}, windows of {WINDOW}: {power:.0%}")
    assert power >= min_power


def test_report_names_what_drifted(digits, trained):
    images, _, _, pool = digits
    model, reference = trained
    report = drift.check_window(reference, 1.0 - images[pool[:WINDOW]], model=model)
    assert report.drifted and report.score > 0.5
    assert "mean_intensity" in report.drifted_features
    assert report.class_drifted and report.class_psi > 0.25
    assert sum(report.predicted_counts.values()) == WINDOW
    json.dumps(report.to_dict())  # serialisable as logged to MLflow


def test_class_shift_alone_is_flagged_by_chi2_and_psi(digits, trained):
    """Only one class arrives (images look normal individually): the class test catches it."""
    images, target, _, pool = digits
    model, reference = trained
    ones = pool[target[pool] == 1][:60]
    for cfg in (drift.DriftConfig(), drift.DriftConfig(class_test="psi")):
        report = drift.check_window(reference, images[ones], model=model, config=cfg)
        assert report.class_drifted, cfg


def test_image_statistics_work_without_a_model(digits):
    images, target, train, pool = digits
    reference = drift.build_reference(images[train], CLASSES, labels=target[train])
    assert reference.embedding.shape == (len(train), 0)
    assert not drift.check_window(reference, images[pool[:WINDOW]]).drifted
    assert drift.check_window(reference, 1.0 - images[pool[:WINDOW]]).drifted
    # predicted classes supplied by the caller (e.g. recorded by the serving app)
    report = drift.check_window(reference, images[pool[:WINDOW]], predicted=target[pool[:WINDOW]])
    assert report.class_p is not None and not report.class_drifted


def test_benjamini_hochberg_and_bonferroni_adjustments():
    p = np.array([0.01, 0.04, 0.03, 0.5])
    assert np.allclose(drift.adjust_p_values(p, "bonferroni"), [0.04, 0.16, 0.12, 1.0])
    # BH: sorted 0.01, 0.03, 0.04, 0.5 -> 0.04, 0.0533, 0.0533, 0.5
    assert np.allclose(drift.adjust_p_values(p, "bh"), [0.04, 0.05333333, 0.05333333, 0.5])
    # ties, values that cap at 1, and the step-up minimum (scipy's false_discovery_control)
    p = np.array([0.2, 0.001, 0.2, 0.9, 0.04, 0.6, 0.04])
    assert np.allclose(drift.adjust_p_values(p, "bh"), [0.28, 0.007, 0.28, 0.9, 0.093333, 0.7, 0.093333])


def _ks_as_before(ref: np.ndarray, win: np.ndarray) -> tuple[float, float]:
    """The hand-written KS test drift.py used before scipy: exact statistic, asymptotic p-value."""
    from scipy import stats as st

    ref, win = np.sort(ref), np.sort(win)
    values = np.concatenate([ref, win])
    d = np.max(np.abs(np.searchsorted(ref, values, side="right") / len(ref)
                      - np.searchsorted(win, values, side="right") / len(win)))
    return float(d), float(st.kstwo.sf(d, round(len(ref) * len(win) / (len(ref) + len(win)))))


def test_ks_tests_over_all_columns_match_the_previous_implementation():
    rng = np.random.default_rng(7)
    ref = rng.normal(size=(1000, 5))
    win = np.column_stack([
        rng.normal(size=100),  # same distribution
        rng.normal(0.4, 1, size=100),  # shifted
        rng.normal(0, 2, size=100),  # wider
        np.round(rng.normal(size=100)),  # ties within and across the samples
        rng.normal(size=100),
    ])
    ref[:, 3] = np.round(ref[:, 3])
    statistics, p_values = drift.ks_test_columns(ref, win)
    for i in range(ref.shape[1]):
        d, p = _ks_as_before(ref[:, i], win[:, i])
        assert statistics[i] == pytest.approx(d, abs=1e-12)
        assert p_values[i] == pytest.approx(p, rel=1e-9, abs=1e-300)
    assert p_values[0] > 0.05 and p_values[1] < 1e-3  # and the decisions follow
    # two samples that do not overlap: the largest possible statistic
    statistics, p_values = drift.ks_test_columns(np.zeros((50, 1)), np.ones((40, 1)))
    assert statistics[0] == 1.0 and p_values[0] < 1e-10


def test_reference_round_trips_through_npz(tmp_path, digits, trained):
    _, reference = trained
    path = tmp_path / "ref.npz"
    reference.save(path)
    loaded = drift.Reference.load(path)
    assert loaded.classes == reference.classes and loaded.preprocess == DIGITS
    assert np.allclose(loaded.embedding, reference.embedding)
    assert np.allclose(loaded.pca_components, reference.pca_components)


def test_window_files_npy_and_parquet(tmp_path, digits):
    images = digits[0][:40]
    np.save(tmp_path / "w.npy", (images * 255).astype(np.uint8))
    assert np.allclose(drift.load_window(tmp_path / "w.npy", DIGITS), images[:, None], atol=1 / 255)
    pd.DataFrame({"pixels": [im.ravel().tolist() for im in images]}).to_parquet(tmp_path / "w.parquet")
    assert np.allclose(drift.load_window(tmp_path / "w.parquet", DIGITS), images[:, None])
    # image files, decoded by the model's preprocessing (any size: resized like serving does)
    files = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray((im * 255).astype(np.uint8)).resize((16, 16)).save(buf, "PNG")
        files.append(buf.getvalue())
    pd.DataFrame({"image": files}).to_parquet(tmp_path / "f.parquet")
    assert drift.load_window(tmp_path / "f.parquet", DIGITS).shape == (40, 1, 8, 8)


def test_colour_windows_in_any_layout_and_a_colour_shift_is_flagged(tmp_path):
    """Colour models: (N, H, W, C) or (N, C, H, W) windows; the reference records the model's
    preprocessing (normalisation undone for the statistics); a channel swap keeps the intensity
    but is caught by the per-channel means."""
    pre = resnet(size=6).preprocess
    rng = np.random.default_rng(0)
    tint = np.float32([[[1.0]], [[0.5]], [[0.2]]])  # reddish images
    ref_images = rng.uniform(0, 1, (300, 3, 6, 6)).astype(np.float32) * tint
    reference = drift.build_reference(ref_images, ["a", "b"], preprocess=pre, labels=rng.integers(0, 2, 300))
    assert reference.preprocess == pre and "mean_red" in reference.feature_names()
    reference.save(tmp_path / "ref.npz")
    assert drift.Reference.load(tmp_path / "ref.npz").preprocess == pre
    window = ref_images[:100]
    np.save(tmp_path / "hwc.npy", (window.transpose(0, 2, 3, 1) * 255).round().astype(np.uint8))
    assert np.allclose(drift.load_window(tmp_path / "hwc.npy", pre), window, atol=1 / 255)
    fresh = rng.uniform(0, 1, (100, 3, 6, 6)).astype(np.float32) * tint
    assert not drift.check_window(reference, fresh).drifted
    swapped = drift.check_window(reference, fresh[:, ::-1])
    assert swapped.drifted and {"mean_red", "mean_blue"} <= set(swapped.drifted_features)
    with pytest.raises(InvalidInput, match="window images are 1x6x6, the model expects 3x6x6"):
        drift.as_images(np.zeros((40, 6, 6)), pre)
    # the serving app's windows: model inputs of the stable model, written as pixel values
    live = drift.InputWindow(capacity=10)
    live.add([pre.normalise(im) for im in window[:5]], pre)
    assert np.allclose(live.take(), window[:5], atol=1e-5)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (np.zeros((40, 5, 5)), "window images are 1x5x5, the model expects 1x8x8"),
        (np.zeros((40, 8, 7)), "the model expects 1x8x8"),
        (np.zeros((40, 2, 8, 8)), "1 or 3 channels"),
        (np.full((40, 8, 8), 300.0), "0-255"),
    ],
)
def test_bad_windows_are_one_clear_error(tmp_path, content, message):
    np.save(tmp_path / "w.npy", content)
    with pytest.raises(InvalidInput, match=message):
        drift.load_window(tmp_path / "w.npy", DIGITS)


def test_small_window_and_bad_config_are_rejected(digits):
    images, target, train, _ = digits
    reference = drift.build_reference(images[train], CLASSES, labels=target[train])
    with pytest.raises(InvalidInput, match="at least 30 images"):
        drift.check_window(reference, images[:10])
    with pytest.raises(InvalidInput, match="drift setting: correction"):
        drift.make_config(correction="holm")
    with pytest.raises(InvalidInput, match="must be .npy or .parquet"):
        drift.load_window(__file__, DIGITS)


def test_live_input_window_is_a_bounded_uniform_sample_written_atomically(tmp_path):
    from flowops.errors import NotFound
    from flowops.settings import get_settings

    window = drift.InputWindow(capacity=100, seed=0)
    for start in range(0, 10_000, 50):  # 10,000 images in requests of 50; image i holds value i
        window.add([np.full((1, 8, 8), i / 10_000, dtype=np.float32)
                    for i in range(start, start + 50)], DIGITS)
    assert window.seen == 10_000 and len(window.images) == 100
    values = np.array(sorted(img[0, 0, 0] * 10_000 for img in window.images))
    assert values.min() < 2_000 and values.max() > 8_000  # drawn from all the traffic, not the start
    assert 3_000 < values.mean() < 7_000

    s = get_settings(home=tmp_path)
    with pytest.raises(NotFound, match="no live-input window"):
        drift.newest_window(s)
    sample = window.take()
    assert sample.shape == (100, 1, 8, 8)
    assert np.allclose(np.sort(sample[:, 0, 0, 0]) * 10_000, values, atol=0.1)
    assert window.take() is None and window.seen == 0  # a new window starts empty
    window.add([np.zeros((1, 8, 8), dtype=np.float32)], DIGITS)
    window.add([np.zeros((3, 4, 4), dtype=np.float32)], Preprocess(size=4, channels=3))
    assert len(window.images) == 1 and window.seen == 1  # a new stable model: a new window
    paths = [drift.write_window(s, sample, f"r{i}", keep=3) for i in range(5)]
    kept = sorted(Path(drift.windows_location(s)).glob("*"))
    assert Path(drift.windows_location(s)) == s.home / "storage" / "drift" / "windows"
    assert [p.name for p in kept] == [Path(p).name for p in paths[-3:]]  # the newest 3, no temp files
    assert drift.newest_window(s) == paths[-1]
    assert drift.load_window(paths[-1], DIGITS).shape == (100, 1, 8, 8)


def test_one_drifted_window_does_not_tell_the_loop_but_a_persisting_drift_does(tmp_path):
    """`drift_detected` needs `persist` consecutive drifted windows of the model (drift history)."""
    from flowops import events
    from flowops.settings import Settings

    s = Settings(home=tmp_path)
    drift.save_report(s, {"model": "digits-classifier", "drifted": True})
    assert not drift_monitor.persisted(s, "digits-classifier", 2)  # one noisy window
    drift.save_report(s, {"model": "other-model", "drifted": False})  # another model's windows
    drift.save_report(s, {"model": "digits-classifier", "drifted": True})
    assert drift_monitor.persisted(s, "digits-classifier", 2)
    assert drift.latest_report(s) == {"model": "digits-classifier", "drifted": True}
    drift.save_report(s, {"model": "digits-classifier", "drifted": False})
    assert not drift_monitor.persisted(s, "digits-classifier", 2)  # the drift went away
    assert drift_monitor.persisted(s, "other-model", 1) is False
    assert events.read_events(s) == []


def test_windows_live_in_the_storage_uri_so_any_node_reads_them(tmp_path, s3_endpoint):  # noqa: F811
    """A replica on any node writes its windows to the storage URI (here S3, moto's server); the
    monitor, elsewhere, lists and reads them through the same URI."""
    from flowops.drift_monitor import DriftMonitorConfig

    bucket = s3_endpoint.bucket("drift-windows")
    s = get_settings(home=tmp_path / "replica-home", storage_uri=f"s3://{bucket}/platform",
                     storage_endpoint_url=s3_endpoint.url)
    sample = np.random.default_rng(0).random((12, 1, 8, 8), dtype=np.float32)
    written = [drift.write_window(s, sample, f"r{i}", keep=2) for i in range(3)]
    assert written[-1].startswith(f"s3://{bucket}/platform/drift/windows/")
    keys = sorted(o["Key"] for o in s3_endpoint.client().list_objects_v2(
        Bucket=bucket, Prefix="platform/drift/windows/")["Contents"] if o["Key"].endswith(".npy"))
    assert [k.rsplit("/", 1)[1] for k in keys] == [w.rsplit("/", 1)[1] for w in written[-2:]]
    assert not (tmp_path / "replica-home").exists()  # nothing on this node's disk

    monitor = get_settings(home=tmp_path / "monitor-home", storage_uri=f"s3://{bucket}/platform",
                           storage_endpoint_url=s3_endpoint.url)
    assert drift.newest_window(monitor) == written[-1]
    assert sorted(w for w, _ in drift.list_windows(monitor, drift.windows_location(monitor))) == written[-2:]
    assert np.allclose(drift.load_window(written[-1], DIGITS, monitor), sample, atol=1 / 255)
    assert DriftMonitorConfig(watch=drift.windows_location(monitor)).watch == f"s3://{bucket}/platform/drift/windows"
    with pytest.raises(InvalidInput, match="does not exist"):
        drift.load_window(f"s3://{bucket}/platform/drift/windows/nope.npy", DIGITS, monitor)


def test_the_reference_images_of_a_sharded_version_are_those_of_its_folder_version(tmp_path):
    """The drift reference reads a version's training images where they are: the shards a folder
    version migrated to give the same pixels and labels."""
    from flowops import data, shard_import
    from flowops.settings import get_settings

    s = get_settings(home=tmp_path / "home")
    data.init_dataset(s)
    sharded = shard_import.migrate_version(s, "v1", images_per_shard=300).version
    pre = Preprocess(size=8, channels=1)
    got = {}
    for tag in ("v1", sharded):
        x, y, classes = drift_monitor.reference_images(data.open_version(s, tag), pre)
        assert len(x) == len(y) == len(data.open_version(s, tag).rows("train", labeled=True))
        got[tag] = sorted(zip(y.tolist(), (row.tobytes() for row in x), strict=True))
    assert got["v1"] == got[sharded]
