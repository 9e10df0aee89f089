"""A small hyperparameter search (learning rate, width) with Ray Tune + ASHA; registers the best.

    python -m jobs.tune --data-version v1 --trials 4 --epochs 4
"""

from __future__ import annotations

import argparse

from flowops.entrypoint import run_entrypoint


def main(argv: list[str] | None = None) -> None:
    import json

    from pydantic import ValidationError

    from flowops.errors import InvalidInput
    from flowops.settings import get_settings
    from flowops.tune import TuneConfig, run_tune

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-version", default=None, help="data version id (vN); default: latest")
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--epochs", type=int, default=4, help="most epochs per trial")
    p.add_argument("--experiment", default="tune")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-name", default=None)
    p.add_argument("--no-register", action="store_true")
    args = p.parse_args(argv)
    try:
        config = TuneConfig(data_version=args.data_version, trials=args.trials, epochs=args.epochs,
                            experiment=args.experiment, seed=args.seed, model_name=args.model_name,
                            register_version=not args.no_register)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InvalidInput(f"--{str(first['loc'][0]).replace('_', '-')}: {first['msg']}") from None
    result = run_tune(get_settings(), config)
    print(json.dumps(result, default=str), flush=True)


if __name__ == "__main__":
    run_entrypoint(main)
