"""Attention over a packed stream of rows: each row (segment of ``cu_seqlens``) attends to itself only.

Both backends take the stream as THD (``PackedSeqParams``, ``qkv_format="thd"``):

* Transformer Engine runs it as varlen attention;
* the local spec (CPU) runs megatron's own ``DotProductAttention`` on each segment alone
  (``SegmentedDotProductAttention``): each row costs its own length squared, where a
  block-diagonal mask over the stream would cost the stream's length squared (measured on CPU:
  packing was then slower than padding).

RoPE: the mrope angles megatron computes from ``position_ids`` are per token, [T, 1, 1, d];
megatron-core 0.16.1's unfused THD RoPE (``rope_utils._apply_rotary_pos_emb_thd``) takes, for each
segment, the angles at that segment's offset in the stream, because their length equals
``cu_seqlens[-1]`` (the tail of padding is a segment too, so it always does). The fused THD kernel
would instead restart 1-D positions per segment, which is wrong for mrope: ``apply_rope_fusion`` is
refused.
"""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.dot_product_attention import DotProductAttention


def packed_attention_inputs(
    cu_seqlens: torch.Tensor, max_seqlen: Optional[int], total: int, *, backend: str, config
) -> tuple[Optional[torch.Tensor], Optional[PackedSeqParams]]:
    """(attention_mask, packed_seq_params) for the language model's ``forward`` on a packed stream:
    THD parameters on both backends (the local spec attends per segment), no mask."""
    if backend not in ("te", "local"):
        raise ValueError(f"unknown backend {backend!r} for packed attention; choose local or te")
    if getattr(config, "apply_rope_fusion", False):
        raise ValueError("packed micro-batches (train.max_tokens_per_micro_batch) need apply_rope_fusion=False: "
                         "the fused THD RoPE restarts 1-D positions per row, mrope needs each token's own")
    if getattr(config, "context_parallel_size", 1) > 1:
        raise ValueError("packed micro-batches are not supported with context parallelism")
    if cu_seqlens.dim() != 1 or max_seqlen is None:
        raise ValueError("a packed stream needs cu_seqlens [segments + 1] and max_seqlen (see training.packing)")
    cu = cu_seqlens.to(torch.int32)
    return None, PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                 max_seqlen_q=int(max_seqlen), max_seqlen_kv=int(max_seqlen))


class SegmentedDotProductAttention(DotProductAttention):
    """megatron's local ``DotProductAttention``, and for a THD stream (``packed_seq_params``) the same
    computation on each segment alone: every row attends causally to itself at the cost of its own
    length squared (a block mask over the stream would pay the stream's length squared)."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is None:
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias)
        # THD: [T, heads, dim]; each segment runs as a batch of one, [l, 1, heads, dim].
        bounds = packed_seq_params.cu_seqlens_q.tolist()
        out = [super(SegmentedDotProductAttention, self).forward(
                   query[s:e].unsqueeze(1), key[s:e].unsqueeze(1), value[s:e].unsqueeze(1), None, attn_mask_type)
               for s, e in zip(bounds[:-1], bounds[1:])]
        return torch.cat(out, dim=0)  # [T, 1, heads * dim]; the attention reshapes it to (T, 1, -1)
