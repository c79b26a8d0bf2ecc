"""Qwen2.5-VL vision tower built from megatron-core modules, tensor-parallel; Qwen2-VL's too (its
family, ``models/families.py``: LayerNorm blocks and merger, plain MLP, no windows).

Data layout: all images of a batch are one packed sequence of N patches (megatron [s, b=1, h]).
Patches arrive in the processor's order (per image, 2x2 merge blocks contiguous). Layers that are not
in ``fullatt_block_indexes`` attend within windows of ``window_size`` pixels; HF reorders the merge
units window by window first (so every window is contiguous) and undoes the order after the merger.
We reproduce that ordering exactly, and express "attend within a window / within an image" as a
block-diagonal region over the reordered sequence: a boolean mask on CPU, packed ``cu_seqlens`` with
Transformer Engine. On CPU, R regions of one length L (images of one size, whole windows) run instead
as a batch of R sequences [L, R, h]: the same numbers from R times fewer attention scores than the
(R*L)^2 of one masked sequence.

The layers are called one by one (full-attention and windowed layers take different regions), so
what megatron's ``TransformerBlock.forward`` does around its layers is done here too: the FP8
context (``fp8_vision``; the patch sequence padded to what TE's FP8 GEMMs need) and full activation
recompute (``recompute: full``), each layer's input kept and the layer recomputed in backward.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import Fp8Recipe
from megatron.core.fp8_utils import get_fp8_context
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from ..local_spec import NORMS
from .config import Qwen25VLExtras
from .specs import FP8_ROWS_MULTIPLE


@dataclass
class VisionLayout:
    """Index bookkeeping for one packed image batch (depends only on grid_thw and the config)."""

    window_index: torch.Tensor  # [N/m^2] merge-unit order after window reordering
    reverse_index: torch.Tensor  # inverse permutation of window_index
    cu_window_seqlens: torch.Tensor  # [W+1] patch offsets of the windows (reordered sequence)
    cu_image_seqlens: torch.Tensor  # [I+1] patch offsets of the images / frames
    rotary_angles: torch.Tensor  # [N, head_dim] in the reordered sequence


def patch_hw_positions(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(h, w) patch coordinates [N, 2] in the processor's order: merge blocks contiguous."""
    out = []
    for t, h, w in grid_thw.tolist():
        hh = torch.arange(h).view(h // merge, merge, 1, 1).expand(h // merge, merge, w // merge, merge)
        ww = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, w // merge, merge)
        # block-major: (block row, block col, row in block, col in block)
        hw = torch.stack([hh.permute(0, 2, 1, 3).reshape(-1), ww.permute(0, 2, 1, 3).reshape(-1)], dim=-1)
        out.append(hw.repeat(t, 1))
    return torch.cat(out, dim=0)


def window_order(grid_thw: torch.Tensor, merge: int, window_size: int, patch_size: int):
    """Merge-unit permutation that makes each window contiguous, and the window offsets in patches.

    A window covers ``window_size // patch_size // merge`` merge units per side; windows are
    enumerated row-major over the (padded) merged grid of each frame, and within a window units are
    row-major. Partial windows at the right/bottom edges keep only their real units.
    """
    units_per_side = window_size // merge // patch_size
    if units_per_side < 1:
        raise ValueError(f"window_size {window_size} is smaller than one merge unit ({merge * patch_size} px)")
    unit = merge * merge
    order, cu = [], [0]
    base = 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        ids = torch.arange(t * gh * gw).view(t, gh, gw)
        for frame in range(t):
            for wy in range(0, gh, units_per_side):
                for wx in range(0, gw, units_per_side):
                    block = ids[frame, wy : wy + units_per_side, wx : wx + units_per_side].reshape(-1)
                    order.append(block + base)
                    cu.append(cu[-1] + block.numel() * unit)
        base += t * gh * gw
    return torch.cat(order), torch.tensor(cu, dtype=torch.int32)


def vision_rotary_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """Axial 2-D RoPE: head_dim/4 frequencies, shared by the h and w axes."""
    spatial = head_dim // 2
    return 1.0 / (theta ** (torch.arange(0, spatial, 2, dtype=torch.float) / spatial))


def build_vision_layout(grid_thw: torch.Tensor, extras: Qwen25VLExtras) -> VisionLayout:
    merge = extras.spatial_merge_size
    grid_thw = grid_thw.to("cpu", torch.long)
    frame_sizes = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    cu_image = F.pad(frame_sizes.cumsum(0), (1, 0)).to(torch.int32)
    if extras.family.vision_windows:
        window_index, cu_window = window_order(grid_thw, merge, extras.window_size, extras.patch_size)
    else:  # Qwen2-VL: no windows, the processor's order throughout (every block attends per image)
        window_index, cu_window = torch.arange(int(frame_sizes.sum()) // (merge * merge)), cu_image
    inv_freq = vision_rotary_inv_freq(extras.vision_head_dim, extras.vision_rope_theta)
    hw = patch_hw_positions(grid_thw, merge).float()
    angles = torch.cat([hw[:, :1] * inv_freq, hw[:, 1:] * inv_freq], dim=-1)  # [N, head_dim/2]
    angles = torch.cat([angles, angles], dim=-1)  # rotate-half layout over the whole head
    unit = merge * merge
    angles = angles.view(-1, unit, angles.shape[-1])[window_index].reshape(-1, angles.shape[-1])
    return VisionLayout(window_index, torch.argsort(window_index), cu_window, cu_image, angles)


def block_diagonal_mask(cu_seqlens: torch.Tensor, n: int, device=None) -> torch.Tensor:
    """[1, 1, n, n] bool, True where attention is *not* allowed (megatron's mask convention)."""
    segment = torch.repeat_interleave(
        torch.arange(len(cu_seqlens) - 1, device=device), (cu_seqlens[1:] - cu_seqlens[:-1]).to(device).long()
    )
    return (segment[:, None] != segment[None, :]).view(1, 1, n, n)


def equal_region_length(cu_seqlens: torch.Tensor) -> Optional[int]:
    """The common length of the regions ``cu_seqlens`` delimits, or None if they differ (or none)."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    if len(lengths) == 0 or not bool((lengths == lengths[0]).all()):
        return None
    return int(lengths[0])


def regions_as_batch(x: torch.Tensor, regions: int) -> torch.Tensor:
    """[R*L, 1, ...] (R equal regions one after another) -> [L, R, ...]: each region one sequence."""
    return x.view(regions, -1, *x.shape[2:]).transpose(0, 1).contiguous()


def packed_params(cu_seqlens: torch.Tensor, device) -> PackedSeqParams:
    cu = cu_seqlens.to(device=device, dtype=torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_len, max_seqlen_kv=max_len
    )


class PerTokenRotarySelfAttention(SelfAttention):
    """Self-attention whose rotary angles are given per token, not per position in a sequence.

    Megatron applies RoPE to packed (THD) input by restarting positions at every ``cu_seqlens``
    boundary; vision windows need each patch's own 2-D angles instead. So the angles are applied to
    q and k straight after the QKV projection, before any packing, for every backend alike.
    """

    _per_token_rotary: Optional[torch.Tensor] = None

    def forward(self, hidden_states, attention_mask, *args, rotary_pos_emb=None, **kwargs):
        self._per_token_rotary = rotary_pos_emb
        try:
            return super().forward(hidden_states, attention_mask, *args, rotary_pos_emb=None, **kwargs)
        finally:
            self._per_token_rotary = None

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None, *args, **kwargs):
        out = super().get_query_key_value_tensors(hidden_states, key_value_states, *args, **kwargs)
        if self._per_token_rotary is None:
            return out
        query, key, *rest = out
        query = apply_rotary_pos_emb(query, self._per_token_rotary, config=self.config)
        key = apply_rotary_pos_emb(key, self._per_token_rotary, config=self.config)
        return (query, key, *rest)


class PatchMerger(MegatronModule):
    """Norm per patch (the family's: RMSNorm or LayerNorm), then 2x2 patches concatenated -> Linear ->
    GELU -> Linear (TP: column, row)."""

    def __init__(self, config: TransformerConfig, context_dim: int, out_dim: int, merge: int, norm: str = "RMSNorm"):
        super().__init__(config=config)
        self.hidden = context_dim * merge * merge
        self.ln_q = NORMS[norm](config, context_dim, eps=1e-6)
        init = config.init_method
        self.linear_fc1 = tensor_parallel.ColumnParallelLinear(
            self.hidden, self.hidden, config=config, init_method=init, bias=True, gather_output=False
        )
        self.linear_fc2 = tensor_parallel.RowParallelLinear(
            self.hidden, out_dim, config=config, init_method=config.output_layer_init_method, bias=True,
            input_is_parallel=True, skip_bias_add=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_q(x).reshape(-1, 1, self.hidden)
        x, _ = self.linear_fc1(x)
        x = F.gelu(x)
        x, _ = self.linear_fc2(x)
        return x.squeeze(1)


class Qwen25VisionModel(MegatronModule):
    """Conv3d patch embedding, ``depth`` megatron TransformerLayers, patch merger."""

    #: Local backend: run equal-length regions as a batch (see the module doc). False: always the
    #: block-diagonal mask; the numbers agree to float rounding (tests compare the two).
    batch_equal_regions: bool = True

    def __init__(self, config: TransformerConfig, layer_spec: ModuleSpec, extras: Qwen25VLExtras, backend: str = "local"):
        super().__init__(config=config)
        self.extras = extras
        self.backend = backend
        kernel = (extras.temporal_patch_size, extras.patch_size, extras.patch_size)
        self.patch_embed = torch.nn.Module()
        self.patch_embed.proj = torch.nn.Conv3d(
            extras.in_channels, config.hidden_size, kernel_size=kernel, stride=kernel, bias=False,
            dtype=config.params_dtype,
        )
        self.decoder = TransformerBlock(
            config=config,
            spec=TransformerBlockSubmodules(layer_specs=[layer_spec] * config.num_layers, layer_norm=None),
            post_layer_norm=False,
            pre_process=True,
            post_process=False,
        )
        self.merger = PatchMerger(config, config.hidden_size, extras.out_hidden_size, extras.spatial_merge_size,
                                  norm=extras.family.merger_norm)
        self.full_attention_layers = set(extras.fullatt_block_indexes)

    def _region_args(self, cu_seqlens: torch.Tensor, n: int, device) -> dict:
        """Layer arguments for attention within each region; ``regions``: R > 1 where the (local)
        layer runs the R equal regions as a batch instead (``_run_layers``)."""
        if self.backend == "te":
            return {"attention_mask": None, "packed_seq_params": packed_params(cu_seqlens, device)}
        length = equal_region_length(cu_seqlens) if self.batch_equal_regions else None
        if length is not None and length * (len(cu_seqlens) - 1) == n and len(cu_seqlens) > 2:
            no_mask = torch.zeros(1, 1, length, length, dtype=torch.bool, device=device)
            return {"attention_mask": no_mask, "regions": len(cu_seqlens) - 1}
        return {"attention_mask": block_diagonal_mask(cu_seqlens, n, device)}

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, layout: Optional[VisionLayout] = None):
        """pixel_values [N, C*T*P*P] (processor output), grid_thw [I, 3] -> merged embeddings [N/m^2, out]."""
        ex = self.extras
        layout = layout if layout is not None else build_vision_layout(grid_thw, ex)
        proj = self.patch_embed.proj
        x = pixel_values.to(proj.weight.dtype).view(-1, ex.in_channels, ex.temporal_patch_size, ex.patch_size, ex.patch_size)
        x = proj(x).view(-1, self.config.hidden_size)
        n, unit = x.shape[0], ex.spatial_merge_size**2
        if n != layout.rotary_angles.shape[0]:
            raise ValueError(f"pixel_values hold {n} patches but grid_thw describes {layout.rotary_angles.shape[0]}")
        device = x.device
        window_index = layout.window_index.to(device)
        x = x.view(-1, unit, x.shape[-1])[window_index].reshape(n, 1, -1)  # [s, b=1, h]
        rotary = layout.rotary_angles.to(device).view(n, 1, 1, -1)
        cu_window, cu_image = layout.cu_window_seqlens, layout.cu_image_seqlens
        pad = (-n) % self.sequence_multiple
        if pad:
            # Padding patches form a region of their own (no real patch attends to them) and are
            # dropped before the merger.
            x = torch.cat([x, x.new_zeros(pad, 1, x.shape[-1])])
            rotary = torch.cat([rotary, rotary.new_zeros(pad, *rotary.shape[1:])])
            cu_window = torch.cat([cu_window, cu_window[-1:] + pad])
            cu_image = torch.cat([cu_image, cu_image[-1:] + pad])
        image_args = self._region_args(cu_image, n + pad, device)
        # Without windows (Qwen2-VL) every block attends per image: one region set, built once.
        window_args = self._region_args(cu_window, n + pad, device) if ex.family.vision_windows else image_args
        x = self._run_layers(x, rotary, window_args, image_args)[:n]
        merged = self.merger(x.squeeze(1))
        return merged[layout.reverse_index.to(device)]

    @property
    def sequence_multiple(self) -> int:
        """Patch count multiple the layers need: TE's FP8 GEMMs take rows in multiples of 8."""
        return FP8_ROWS_MULTIPLE if self.config.fp8 else 1

    def _run_layers(self, x, rotary, window_args: dict, image_args: dict) -> torch.Tensor:
        """Every layer under the FP8 context and with full recompute, as ``TransformerBlock`` does.

        Delayed scaling wraps the whole pass in one FP8 context; the other recipes enter it per
        layer (megatron 0.16.1 ``TransformerBlock.forward``). The context is created inside the
        layer function, so a recomputed layer enters a fresh one.
        """
        config = self.config
        delayed = bool(config.fp8) and config.fp8_recipe == Fp8Recipe.delayed
        per_layer = bool(config.fp8) and not delayed
        recompute = config.recompute_granularity == "full" and self.training and torch.is_grad_enabled()

        def layer_fn(layer, args):
            args = dict(args)
            regions = args.pop("regions", None)
            angles = rotary if regions is None else regions_as_batch(rotary, regions)

            def run(hidden):
                if regions is not None:
                    hidden = regions_as_batch(hidden, regions)
                with get_fp8_context(config, layer.layer_number - 1) if per_layer else nullcontext():
                    out, _ = layer(hidden_states=hidden, rotary_pos_emb=angles, **args)
                return out if regions is None else out.transpose(0, 1).reshape(-1, 1, out.shape[-1])
            return run

        with get_fp8_context(config) if delayed else nullcontext():
            for index, layer in enumerate(self.decoder.layers):
                run = layer_fn(layer, image_args if index in self.full_attention_layers else window_args)
                x = self._checkpoint(run, x) if recompute else run(x)
        return x

    def _checkpoint(self, run, x: torch.Tensor) -> torch.Tensor:
        """megatron's activation checkpoint of one layer (Transformer Engine's under FP8, which
        replays the layer with the FP8 scaling state of its first run)."""
        config = self.config
        if config.fp8:
            from megatron.core.extensions.transformer_engine import te_checkpoint

            return te_checkpoint(run, config.distribute_saved_activations, tensor_parallel.random.get_cuda_rng_tracker,
                                 parallel_state.get_tensor_model_parallel_group(), x)
        return tensor_parallel.checkpoint(run, config.distribute_saved_activations, x)
