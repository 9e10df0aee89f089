"""Train the image classifier on a data version (Ray Train, or in this process with --local).

    python -m jobs.train --data-version v1 --workers 2 --epochs 5
    python -m jobs.train --local --epochs 3
"""

from __future__ import annotations

import argparse

from flowops.entrypoint import run_entrypoint


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-version", default=None, help="data version id (vN); default: latest")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--gpus-per-worker", type=float, default=0.0)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--init-from", default=None, help="models:/<name>@<alias> or models:/<name>/<N>")
    p.add_argument("--freeze-epochs", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--experiment", default="train")
    p.add_argument("--model-name", default=None)
    p.add_argument("--include-pseudo", action="store_true")
    p.add_argument("--max-failures", type=int, default=2)
    p.add_argument("--run-name", default=None)
    p.add_argument("--no-register", action="store_true", help="track the run but register nothing")
    p.add_argument("--local", action="store_true", help="run the loop in this process, no Ray")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--fault-marker", default=None, help=argparse.SUPPRESS)  # test-only fault hook
    return p


def config_from_args(args: argparse.Namespace):
    from flowops.train import TrainConfig

    return TrainConfig(
        data_version=args.data_version, workers=args.workers, cpus_per_worker=args.cpus_per_worker,
        gpus_per_worker=args.gpus_per_worker, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, width=args.width, init_from=args.init_from, freeze_epochs=args.freeze_epochs,
        seed=args.seed, experiment=args.experiment, model_name=args.model_name,
        include_pseudo=args.include_pseudo, max_failures=args.max_failures, run_name=args.run_name,
        register_version=not args.no_register, local=args.local, fault_marker=args.fault_marker,
    )


def main(argv: list[str] | None = None) -> None:
    import json

    from pydantic import ValidationError

    from flowops.errors import InvalidInput
    from flowops.settings import get_settings
    from flowops.train import train

    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InvalidInput(f"--{str(first['loc'][0]).replace('_', '-')}: {first['msg']}") from None
    result = train(get_settings(), config)
    if args.json:
        print(json.dumps(result.to_dict()))
    print(f"run {result.run_id}: holdout accuracy {result.metrics['holdout_accuracy']:.4f}, "
          f"macro F1 {result.metrics['macro_f1']:.4f}, weights {result.weights_hash[:12]}, "
          f"registered {result.model_name} version {result.version}", flush=True)


if __name__ == "__main__":
    run_entrypoint(main)
