"""The continuous training loop's controller: a long-lived Ray job (`flowops loop start`).

    python -m jobs.controller --config '{"threshold": 50, "max_rollouts": 1}'

The config is `flowops.loop.LoopConfig` as JSON (or `--config @file.json`), sent by
`flowops loop start`.
"""

from __future__ import annotations

from flowops.entrypoint import run_job
from flowops.loop import LoopConfig, run_controller


def main(settings, config: LoopConfig) -> None:
    run_controller(settings, config, say=lambda msg: print(msg, flush=True))


if __name__ == "__main__":
    run_job(LoopConfig, main)
