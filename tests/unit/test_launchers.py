"""The launch scripts: syntax, shellcheck, and the Slurm launcher's commands in DRY_RUN mode.

The Slurm side is faked at the cluster boundary: SLURM_* variables set by the test, and either no
``scontrol`` on PATH (the script parses the node list itself) or a fake ``scontrol`` script.
"""
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = ROOT / "examples" / "run_visurf_7b.sh"
LAUNCHERS = [LAUNCHER, ROOT / "examples" / "run_visurf_tiny.sh"]
BASH = shutil.which("bash") or "/bin/bash"
SHELLCHECK_INSTALL = "apt-get install -y shellcheck"


@pytest.mark.parametrize("script", LAUNCHERS, ids=lambda p: p.name)
def test_bash_syntax(script):
    proc = subprocess.run([BASH, "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason=f"shellcheck not installed ({SHELLCHECK_INSTALL})")
@pytest.mark.parametrize("script", LAUNCHERS, ids=lambda p: p.name)
def test_shellcheck(script):
    proc = subprocess.run(["shellcheck", "-x", str(script)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def make_bin(tmp_path: Path, fake_scontrol: bool) -> Path:
    """A PATH with only what the launcher needs, so a real scontrol never leaks in."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("dirname", "basename"):
        (bindir / tool).symlink_to(shutil.which(tool))
    if fake_scontrol:  # FAKE scontrol: `scontrol show hostnames gpu[003-004]` of a real cluster
        fake = bindir / "scontrol"
        fake.write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] || exit 1\n'
                        'case "$3" in "gpu[003-004]") printf "gpu003\\ngpu004\\n";; *) exit 1;; esac\n')
        fake.chmod(0o755)
    return bindir


def dry_run(tmp_path, nodelist="gpu[003-004]", nnodes=2, fake_scontrol=False, check=True, **env_extra):
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "TP", "PP"))}
    env.update(
        PATH=str(make_bin(tmp_path, fake_scontrol)), DRY_RUN="1", PYTHON=sys.executable,
        SLURM_NODELIST=nodelist, SLURM_NNODES=str(nnodes), SLURM_JOB_ID="123", SLURM_PROCID="0",
        GPUS_PER_NODE="8", MASTER_PORT="29611", RUN_DIR=str(run_dir), HF_MODEL_DIR="/models/Qwen2.5-VL-7B-Instruct",
        DATA_TRAIN="/data/train.jsonl", DATA_VAL="/data/val.jsonl",
    )
    env.update({k: str(v) for k, v in env_extra.items()})
    proc = subprocess.run([BASH, str(LAUNCHER)], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    commands = [shlex.split(line[2:]) for line in proc.stdout.splitlines() if line.startswith("+ ")]
    return proc, commands, run_dir


def find(commands, marker):
    hits = [c for c in commands if any(marker in part for part in c)]
    assert len(hits) <= 1
    return hits[0] if hits else None


def after(cmd, program):
    """The arguments of ``program`` (torchrun) inside an srun command line."""
    return cmd[cmd.index(program) + 1:]


def flag(args, name):
    for i, a in enumerate(args):
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
        if a == name:
            return args[i + 1]
    return None


@pytest.mark.parametrize("fake_scontrol", [False, True], ids=["bash-nodelist-parse", "fake-scontrol"])
def test_dry_run_7b_commands(tmp_path, fake_scontrol):
    _, commands, run_dir = dry_run(tmp_path, fake_scontrol=fake_scontrol, EXTRA="train.steps=3 rollout.n=4")
    assert len(commands) == 3
    train = find(commands, "visurf_megatron.train")
    assert train[0] == "srun" and flag(train, "--nodes") == "2" and "torchrun" in train
    targs = after(train, "torchrun")
    assert flag(targs, "--nnodes") == "2" and flag(targs, "--nproc-per-node") == "8"
    assert flag(targs, "--rdzv-backend") == "c10d" and flag(targs, "--rdzv-id") == "123"
    assert flag(targs, "--rdzv-endpoint") == "gpu003:29611"
    assert flag(targs, "-m") == "visurf_megatron.train"
    assert flag(targs, "--config") == "examples/configs/qwen2_5_vl_7b_visurf.yaml"
    overrides = targs[targs.index("--config") + 2:]
    for expected in (f"model.hf_path=/models/Qwen2.5-VL-7B-Instruct", f"model.megatron_path={run_dir}/megatron_init",
                     "data.train_path=/data/train.jsonl", "data.val_path=/data/val.jsonl",
                     f"checkpoint.dir={run_dir}/checkpoints", f"logging.dir={run_dir}/logs",
                     "parallel.tp=2", "parallel.pp=1"):
        assert expected in overrides
    assert overrides[-2:] == ["train.steps=3", "rollout.n=4"]  # EXTRA last, so it wins

    conv = find(commands, "hf_to_megatron.py")
    cargs = after(conv, "torchrun")
    assert flag(conv, "--ntasks") == "1" and flag(cargs, "--nproc-per-node") == "2"
    assert flag(cargs, "--hf-dir") == "/models/Qwen2.5-VL-7B-Instruct"
    assert flag(cargs, "--out-dir") == f"{run_dir}/megatron_init"
    assert (flag(cargs, "--tp"), flag(cargs, "--pp")) == ("2", "1")
    back = find(commands, "megatron_to_hf.py")
    bargs = after(back, "torchrun")
    assert flag(bargs, "--megatron-dir") == f"{run_dir}/checkpoints"
    assert flag(bargs, "--out-dir") == f"{run_dir}/hf_final"
    assert flag(bargs, "--hf-template") == "/models/Qwen2.5-VL-7B-Instruct"
    assert commands.index(conv) < commands.index(train) < commands.index(back)


def test_dry_run_skips_existing_conversion(tmp_path):
    init = tmp_path / "run" / "megatron_init"
    init.mkdir(parents=True)
    (init / "visurf_meta.json").write_text("{}")
    proc, commands, _ = dry_run(tmp_path)
    assert find(commands, "hf_to_megatron.py") is None and find(commands, "visurf_megatron.train")
    assert "skipping the HF -> Megatron conversion" in proc.stdout


def test_dry_run_other_config_and_tp(tmp_path):
    _, commands, _ = dry_run(tmp_path, CONFIG="examples/configs/qwen2_5_vl_32b_visurf.yaml", TP=4, PP=2)
    targs = after(find(commands, "visurf_megatron.train"), "torchrun")
    assert flag(targs, "--config") == "examples/configs/qwen2_5_vl_32b_visurf.yaml"
    assert "parallel.tp=4" in targs and "parallel.pp=2" in targs
    cargs = after(find(commands, "hf_to_megatron.py"), "torchrun")
    assert flag(cargs, "--nproc-per-node") == "8" and (flag(cargs, "--tp"), flag(cargs, "--pp")) == ("4", "2")


def test_dry_run_72b_converts_across_nodes(tmp_path):
    # tp*pp = 32 ranks > 8 GPUs per node: the conversions span 4 nodes, one rank per GPU.
    _, commands, _ = dry_run(tmp_path, nodelist="node-a[10-17]", nnodes=8,
                             CONFIG="examples/configs/qwen2_5_vl_72b_visurf.yaml")
    conv = find(commands, "hf_to_megatron.py")
    cargs = after(conv, "torchrun")
    assert flag(conv, "--nodes") == "4" and flag(cargs, "--nnodes") == "4" and flag(cargs, "--nproc-per-node") == "8"
    assert flag(cargs, "--rdzv-endpoint") == "node-a10:29612"
    targs = after(find(commands, "visurf_megatron.train"), "torchrun")
    assert flag(targs, "--nnodes") == "8" and flag(targs, "--rdzv-endpoint") == "node-a10:29611"


@pytest.mark.parametrize("nodelist, host", [("gpu001,gpu002", "gpu001"), ("a[7,9-10],b1", "a7"),
                                            ("gpu[010-012]-ib,x", "gpu010-ib")])
def test_nodelist_parsing_without_scontrol(tmp_path, nodelist, host):
    _, commands, _ = dry_run(tmp_path, nodelist=nodelist)
    targs = after(find(commands, "visurf_megatron.train"), "torchrun")
    assert flag(targs, "--rdzv-endpoint") == f"{host}:29611"


@pytest.mark.parametrize("env, message", [
    ({"TP": 3}, "does not validate for world size 16"),
    ({"CONFIG": "examples/configs/nope.yaml"}, "does not exist"),
    ({"SLURM_NODELIST": ""}, "SLURM_NODELIST is not set"),
])
def test_dry_run_errors(tmp_path, env, message):
    nodelist = env.pop("SLURM_NODELIST", "gpu[003-004]")
    proc, commands, _ = dry_run(tmp_path, nodelist=nodelist, check=False, **env)
    assert proc.returncode != 0 and message in proc.stderr and not commands
