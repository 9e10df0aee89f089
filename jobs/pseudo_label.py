"""Pseudo-label a pool of a data version with a registered model (Ray Data, stateful actors).

    python -m jobs.pseudo_label --config '{"model_uri": "models:/digits-classifier/3",
        "data_version": "v1", "pool": "unlabeled", "batch_size": 1024, "actors": 2}'

The config is `flowops.pseudo_label.PseudoLabelConfig` as JSON (or `--config @file.json`).
The last line of the log is `RESULT <JSON>` (what `flowops pseudo-label --json` prints).
"""

from __future__ import annotations

from flowops.entrypoint import print_result, run_job
from flowops.pseudo_label import PseudoLabelConfig, run_pseudo_label


def main(settings, config: PseudoLabelConfig) -> None:
    print_result(run_pseudo_label(settings, config).to_dict())


if __name__ == "__main__":
    run_job(PseudoLabelConfig, main)
