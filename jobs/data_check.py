"""Validate a data version and log the summary to MLflow.

    python -m jobs.data_check --version v1
"""

from __future__ import annotations

import argparse

from flowops.entrypoint import run_entrypoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--version", default="latest", help="data version id (vN) or 'latest'")
    args = parser.parse_args()

    from flowops.data_check import run_data_check
    from flowops.settings import get_settings

    run_data_check(get_settings(), args.version)


if __name__ == "__main__":
    run_entrypoint(main)
