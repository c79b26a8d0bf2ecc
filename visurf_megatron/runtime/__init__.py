"""Launch-side runtime: distributed initialisation, model-parallel groups, CPU shim."""
from .distributed import (
    DistEnv,
    DistributedEnvError,
    first_slurm_host,
    init_distributed,
    read_dist_env,
    seed_everything,
    setup_model_parallel,
    teardown,
)

__all__ = [
    "DistEnv",
    "DistributedEnvError",
    "first_slurm_host",
    "init_distributed",
    "read_dist_env",
    "seed_everything",
    "setup_model_parallel",
    "teardown",
]
