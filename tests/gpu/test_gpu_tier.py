"""GPU tier: Transformer Engine, FP8 and vLLM. Skipped with a reason on machines without CUDA."""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Transformer Engine, FP8, vLLM)")


def test_cuda_matmul_matches_cpu():
    a = torch.randn(64, 64, dtype=torch.float32)
    b = torch.randn(64, 64, dtype=torch.float32)
    assert torch.allclose((a.cuda() @ b.cuda()).cpu(), a @ b, atol=1e-3)
