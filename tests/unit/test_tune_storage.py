"""`flowops tune` probes the storage URI (where its trials checkpoint) before it reaches Ray: a store
it cannot write is one line naming it, on a real data version and a real local folder."""

from __future__ import annotations

import pytest

from flowops import data, storage
from flowops.settings import get_settings
from flowops.tune import TuneConfig, run_tune
from tests.image_folders import write_colour_folder


def test_an_unwritable_storage_fails_before_any_trial(tmp_path):
    write_colour_folder(tmp_path / "photos")
    settings = get_settings(home=tmp_path / "home")
    version = data.init_dataset(settings, tmp_path / "photos", unlabeled_fraction=0.5).id
    (tmp_path / "a-file").write_text("not a folder")
    bad = settings.model_copy(update={"storage_uri": str(tmp_path / "a-file" / "storage"),
                                      "ray_address": "http://127.0.0.1:1"})  # never reached
    with pytest.raises(storage.StorageUnavailable,
                       match=r"^tune: storage .*a-file/storage is unreachable or not writable"):
        run_tune(bad, TuneConfig(data_version=version, trials=1, epochs=1))
