"""Train the image classifier on a data version (Ray Train, or in this process with `local`).

    python -m jobs.train --config '{"data_version": "v1", "workers": 2, "epochs": 5}'
    python -m jobs.train --config '{"local": true, "epochs": 3}'
    python -m jobs.train --config @train.json

The config is `flowops.train.TrainConfig` as JSON (`--help` lists its fields). Prints the result
as one `RESULT <JSON>` line, then a summary line.
"""

from __future__ import annotations

from flowops.entrypoint import print_result, run_job
from flowops.train import TrainConfig, train


def main(settings, config: TrainConfig) -> None:
    result = train(settings, config)
    print_result(result.to_dict())
    print(result.summary(), flush=True)


if __name__ == "__main__":
    run_job(TrainConfig, main)
