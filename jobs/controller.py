"""The continuous training loop's controller: a long-lived Ray job (`flowops loop start`).

    python -m jobs.controller [--max-rollouts N]

Reads its configuration from <home>/loop/config.json (written by `flowops loop start`).
"""

from __future__ import annotations

import argparse

from flowops.entrypoint import run_entrypoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-rollouts", type=int, default=None,
                        help="exit after driving this many rollouts (default: run until stopped)")
    args = parser.parse_args()

    from flowops.loop import load_config, run_controller
    from flowops.settings import get_settings

    settings = get_settings()
    config = load_config(settings)
    if args.max_rollouts:
        config = config.model_copy(update={"max_rollouts": args.max_rollouts})
    run_controller(settings, config, say=lambda msg: print(msg, flush=True))


if __name__ == "__main__":
    run_entrypoint(main)
