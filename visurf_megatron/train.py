"""Entry point: ``python -m visurf_megatron.train --config C [section.key=value ...]``.

Run under torchrun/srun (one process per GPU); on a CPU machine ``--nproc N`` starts N local gloo
ranks itself (what ``examples/run_visurf_tiny.sh`` uses).
"""
from __future__ import annotations

import argparse
import os
import sys


def _run(config_path, overrides) -> None:
    from visurf_megatron.config import load_config
    from visurf_megatron.training.trainer import Trainer

    trainer = Trainer(load_config(config_path, overrides))
    try:
        trainer.train()
    finally:
        trainer.close()  # the rollout engine goes before the process groups do


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m visurf_megatron.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (see examples/configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides such as train.lr=1e-6 parallel.tp=2")
    parser.add_argument("--nproc", type=int, default=None,
                        help="without torchrun/srun: start this many local ranks (gloo on CPU)")
    parser.add_argument("--timeout-s", type=float, default=7 * 24 * 3600, help="with --nproc: kill the run after this long")
    args = parser.parse_args(argv)
    from visurf_megatron.config import ConfigError, load_config

    try:
        load_config(args.config, args.overrides)  # fail fast, before any process starts
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    launched = any(k in os.environ for k in ("RANK", "SLURM_PROCID"))
    if launched or not args.nproc:
        from visurf_megatron.runtime import init_distributed, teardown

        init_distributed()
        try:
            _run(args.config, args.overrides)
        finally:
            teardown()
        return 0
    from visurf_megatron.runtime.spawn import run_world

    run_world(_run, args.nproc, args.config, args.overrides, timeout_s=args.timeout_s,
              env={"PYTHONUNBUFFERED": "1"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
