"""What every `jobs/` entrypoint shares: logging set up by the entrypoint, errors as one line."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from flowops.errors import FlowOpsError


def run_entrypoint(fn: Callable[[], object]) -> None:
    """Run a job's main function; a FlowOps error ends it with one line and its exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        fn()
    except FlowOpsError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)
