"""A small hyperparameter search (learning rate, width) with Ray Tune + ASHA; registers the best.

    python -m jobs.tune --config '{"data_version": "v1", "trials": 4, "epochs": 4}'

The config is `flowops.tune.TuneConfig` as JSON (or `--config @file.json`; `--help` lists it).
"""

from __future__ import annotations

from flowops.entrypoint import print_result, run_job
from flowops.tune import TuneConfig, run_tune


def main(settings, config: TuneConfig) -> None:
    print_result(run_tune(settings, config))


if __name__ == "__main__":
    run_job(TuneConfig, main)
