import pytest
import torch

from visurf_megatron.runtime import DistributedEnvError, first_slurm_host, read_dist_env
from visurf_megatron.runtime import cpu


def test_torchrun_environment():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node7", "MASTER_PORT": "6000"}
    d = read_dist_env(env)
    assert (d.rank, d.world_size, d.local_rank, d.master_addr, d.master_port, d.source) == (3, 8, 1, "node7", 6000, "torchrun")


def test_slurm_environment_takes_first_host():
    env = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_NODELIST": "gpu[003-004,010]"}
    d = read_dist_env(env, default_port=29511)
    assert (d.rank, d.world_size, d.local_rank, d.master_addr, d.master_port, d.source) == (9, 16, 1, "gpu003", 29511, "slurm")


@pytest.mark.parametrize("nodelist, host", [("a1", "a1"), ("node[12-14]", "node12"), ("n[7,9]", "n7"),
                                            ("x-[01-02],y3", "x-01"), ("h1,h2", "h1")])
def test_first_slurm_host(nodelist, host):
    assert first_slurm_host(nodelist) == host


def test_incomplete_environments_are_errors():
    with pytest.raises(DistributedEnvError, match="MASTER_ADDR, MASTER_PORT missing"):
        read_dist_env({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    with pytest.raises(DistributedEnvError, match="SLURM_NODELIST missing"):
        read_dist_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0"})
    with pytest.raises(DistributedEnvError, match="not an integer"):
        read_dist_env({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    assert read_dist_env({}).source == "single"


def test_cpu_shim_is_inert_when_cuda_is_reported(monkeypatch):
    # Fake at the GPU boundary: pretend CUDA exists; the shim must touch nothing.
    cpu.deactivate()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    before = (torch.cuda.current_device, torch.cuda.synchronize)
    assert cpu.activate() is False
    assert not cpu.is_active()
    assert (torch.cuda.current_device, torch.cuda.synchronize) == before


def test_cpu_shim_redirects_cuda_calls_and_undoes_them():
    assert not torch.cuda.is_available()
    original = torch.cuda.current_device
    try:
        assert cpu.activate() is True
        assert torch.zeros(2, device="cuda").device.type == "cpu"
        assert torch.ones(2).cuda().device.type == "cpu"
        assert torch.ones(2).to("cuda").device.type == "cpu"
        assert torch.empty(1, device=torch.cuda.current_device()).device.type == "cpu"
        assert torch.ones(1).type() == "torch.cuda.FloatTensor"
        torch.cuda.synchronize()
    finally:
        cpu.deactivate()
    assert torch.cuda.current_device is original
    assert torch.ones(1).type() == "torch.FloatTensor"
    with pytest.raises((RuntimeError, AssertionError)):
        torch.zeros(1, device="cuda")


def test_cpu_shim_suspension_runs_plain_torch_and_restores_the_mode():
    from torch.overrides import TorchFunctionMode

    class Outer(TorchFunctionMode):  # a mode pushed after the shim's must stay in place
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with cpu.suspended():  # inactive shim: a no-op
        assert torch.ones(1).type() == "torch.FloatTensor"
    try:
        assert cpu.activate() is True
        with cpu.suspended():
            assert torch.ones(1).type() == "torch.FloatTensor"  # the mode's answer is gone inside
            with pytest.raises((RuntimeError, AssertionError)):
                torch.zeros(1, device="cuda")
        assert torch.ones(1).type() == "torch.cuda.FloatTensor"
        assert torch.zeros(1, device="cuda").device.type == "cpu"
        with pytest.raises(ValueError):
            with cpu.suspended():
                raise ValueError("the mode comes back after an error too")
        assert torch.ones(1).type() == "torch.cuda.FloatTensor"
        with Outer():
            with cpu.suspended():  # not the innermost mode: left alone
                assert torch.ones(1).type() == "torch.cuda.FloatTensor"
        assert torch.ones(1).type() == "torch.cuda.FloatTensor"
    finally:
        cpu.deactivate()


def test_cpu_rng_tracker_forks_and_restores():
    tracker = cpu.CpuRNGStatesTracker()
    tracker.add("a", 5)
    torch.manual_seed(0)
    outer_expected = torch.rand(3)
    torch.manual_seed(0)
    with tracker.fork("a"):
        first = torch.rand(3)
    assert torch.equal(torch.rand(3), outer_expected)  # outer stream untouched by the fork
    with tracker.fork("a"):
        second = torch.rand(3)
    assert torch.equal(first, torch.rand(3, generator=torch.Generator().manual_seed(5)))
    assert not torch.equal(first, second)  # the forked stream advances
    with pytest.raises(Exception, match="already exists"):
        tracker.add("b", 5)
    with pytest.raises(Exception, match="not added"):
        with tracker.fork("zzz"):
            pass
