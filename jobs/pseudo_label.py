"""Pseudo-label a pool of a data version with a registered model (Ray Data, stateful actors).

    python -m jobs.pseudo_label --model-uri models:/digits-classifier@production \
        --data-version v1 --pool unlabeled --batch-size 1024 --actors 2 --cpus-per-actor 0.5
"""

from __future__ import annotations

import argparse
import json

from flowops.entrypoint import run_entrypoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-uri", default=None, help="default models:/<name>@production")
    parser.add_argument("--data-version", default=None, help="data version id (default latest)")
    parser.add_argument("--pool", default="unlabeled", help="unlabeled, train, holdout or all")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--cpus-per-actor", type=float, default=0.5)
    parser.add_argument("--gpus-per-actor", type=float, default=0.0)
    parser.add_argument("--size-rule", default="resize", help="resize or exact")
    parser.add_argument("--accept-threshold", type=float, default=None)
    parser.add_argument("--no-version", action="store_true", help="do not cut a data version")
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()

    from pydantic import ValidationError

    from flowops.errors import InvalidInput
    from flowops.pseudo_label import PseudoLabelConfig, run_pseudo_label
    from flowops.settings import get_settings

    try:
        cfg = PseudoLabelConfig(
            model_uri=args.model_uri, data_version=args.data_version, pool=args.pool,
            batch_size=args.batch_size, actors=args.actors, cpus_per_actor=args.cpus_per_actor,
            gpus_per_actor=args.gpus_per_actor, size_rule=args.size_rule,
            accept_threshold=args.accept_threshold, version_output=not args.no_version,
            limit=args.limit,
        )
    except ValidationError as exc:
        raise InvalidInput(_first_error(exc)) from None
    result = run_pseudo_label(get_settings(), cfg)
    print("RESULT " + json.dumps(result.to_dict()), flush=True)


def _first_error(exc) -> str:
    err = exc.errors()[0]
    return f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"


if __name__ == "__main__":
    run_entrypoint(main)
