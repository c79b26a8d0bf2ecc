"""Attention over a packed stream of rows: each row (segment of ``cu_seqlens``) attends to itself only.

* local spec (CPU): an explicit block-diagonal causal mask [1, 1, T, T] (True = masked), which
  megatron's ``DotProductAttention`` takes in place of its default causal mask;
* Transformer Engine: THD ``PackedSeqParams`` (varlen attention, no T^2 mask). The mrope angles
  megatron computes from ``position_ids`` are per token, [T, 1, 1, d]; megatron-core 0.16.1's
  unfused THD RoPE (``rope_utils._apply_rotary_pos_emb_thd``) then takes, for each segment, the angles
  at that segment's offset in the stream, because their length equals ``cu_seqlens[-1]`` (the tail
  of padding is a segment too, so it always does). The fused THD kernel would instead restart 1-D
  positions per segment, which is wrong for mrope: ``apply_rope_fusion`` is refused.
"""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core.packed_seq_params import PackedSeqParams


def segment_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[T]: which segment each stream position belongs to."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != total or bool((lengths <= 0).any()):
        raise ValueError(f"cu_seqlens {cu_seqlens.tolist()} must rise strictly from 0 to the stream length {total}")
    return torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths)


def block_causal_mask(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[1, 1, T, T] bool, True where query t may not see key s: other segments and the future."""
    seg = segment_ids(cu_seqlens, total)
    future = torch.ones(total, total, dtype=torch.bool, device=seg.device).triu(1)
    return ((seg.unsqueeze(1) != seg.unsqueeze(0)) | future).view(1, 1, total, total)


def packed_attention_inputs(
    cu_seqlens: torch.Tensor, max_seqlen: Optional[int], total: int, *, backend: str, config
) -> tuple[Optional[torch.Tensor], Optional[PackedSeqParams]]:
    """(attention_mask, packed_seq_params) for the language model's ``forward`` on a packed stream."""
    if backend == "te":
        if getattr(config, "apply_rope_fusion", False):
            raise ValueError("packed micro-batches (train.max_tokens_per_micro_batch) need apply_rope_fusion=False: "
                             "the fused THD RoPE restarts 1-D positions per row, mrope needs each token's own")
        if getattr(config, "context_parallel_size", 1) > 1:
            raise ValueError("packed micro-batches are not supported with context parallelism")
        cu = cu_seqlens.to(torch.int32)
        longest = int(max_seqlen) if max_seqlen is not None else int((cu[1:] - cu[:-1]).max())
        return None, PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                     max_seqlen_q=longest, max_seqlen_kv=longest)
    return block_causal_mask(cu_seqlens, total), None
