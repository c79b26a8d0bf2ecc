"""From prompts and responses to the G(+1) rows of a step and their padded micro-batches.

A row is prompt tokens (image placeholders already expanded by the processor) followed by response
tokens: a sampled rollout, or the ground truth rendered in the rollout style and teacher forced
(ending with the end-of-turn token, like a finished rollout). Rows of one prompt share its pixels and
grid; every row carries its own copy in a micro-batch, so any row can sit in any micro-batch.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Sequence, TypeVar

import torch

from visurf_megatron.models.qwen2_5_vl.rope import mrope_position_ids
from visurf_megatron.models.qwen2_5_vl.specs import FP8_ROWS_MULTIPLE


@dataclass
class PreparedPrompt:
    """A prompt as the model sees it (the processor's output for one sample)."""

    sample_id: str
    text: str  # chat-templated prompt text (what the rollout engine receives)
    images: list  # PIL images, resized as configured
    input_ids: torch.Tensor  # [P] with the image placeholders expanded
    pixel_values: torch.Tensor  # [patches, C*T*P*P]
    image_grid_thw: torch.Tensor  # [images, 3]
    solution: object = None  # reward target in the frame of ``images``
    sample: object = None

    @property
    def has_images(self) -> bool:
        """Text-only prompts carry no grid (or an empty one)."""
        return self.image_grid_thw is not None and len(self.image_grid_thw) > 0


@dataclass
class Row:
    prompt: int  # index into the step's prompts (the GRPO group)
    response_ids: list[int]
    is_gt: bool
    text: str = ""
    engine_logprobs: Optional[list[float]] = None
    finish_reason: str = "stop"
    reward: dict = field(default_factory=dict)  # RewardBreakdown.as_dict()


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [B, S]
    labels: torch.Tensor  # [B, S]: next token
    loss_mask: torch.Tensor  # [B, S] float: 1 where labels[t] is a response token
    position_ids: torch.Tensor  # [3, B, S]
    pixel_values: Optional[torch.Tensor]
    image_grid_thw: Optional[torch.Tensor]
    row_index: torch.Tensor  # [B] index into the step's rows; -1 for padding rows
    # What the loss needs of these rows (``RowInfo.select(row_index.clamp(min=0))``), attached by
    # the trainer so that it travels to the model's device with the micro-batch.
    rows: Optional[object] = None
    # [B, S] old-policy log-probs when the batch is split into several updates (else the current
    # ones, detached, are the old ones: ratio 1); padding rows hold zeros and are masked out.
    old_logp: Optional[torch.Tensor] = None
    # Packed layout (``packing.collate_packed``): input_ids, labels and position_ids are one stream
    # [1, T] of whole rows, then padding; what the loss reads (loss_mask, row_index, rows, old_logp)
    # stays per row [R, L] as above, and ``pack_index`` [R, L] says where each row token sits in the
    # stream, so the loss and its normalisers see exactly what the padded layout gives them.
    pack_index: Optional[torch.Tensor] = None
    cu_seqlens: Optional[torch.Tensor] = None  # int32 [K+1]: segment offsets (the rows, then the tail)
    max_seqlen: Optional[int] = None  # longest segment (Transformer Engine's THD attention needs it)
    image_embed_index: Optional[torch.Tensor] = None  # [image slots]: vision output row of each slot
    # Packed with one vision pass per update: the update's images, the same object in every one of
    # its micro-batches (pixel_values is then None; image_embed_index points into its output).
    shared_vision: Optional["SharedVision"] = None

    @property
    def packed(self) -> bool:
        return self.pack_index is not None

    @property
    def real_rows(self) -> torch.Tensor:
        return self.row_index >= 0

    def to(self, device) -> "MicroBatch":
        return to_device(self, device)


class SharedVision:
    """The images of every distinct prompt of an update, in one batch: ``forward.run_micro_batches``
    encodes them once and each micro-batch gathers its image slots from that output through
    ``MicroBatch.image_embed_index``, so the gradients of every row flow into the one pass.

    Deliberately not a dataclass: ``to_device`` moves every dataclass field of every micro-batch,
    and this object is shared by all of them and moved once, by the vision pass."""

    __slots__ = ("pixel_values", "image_grid_thw")

    def __init__(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor):
        self.pixel_values = pixel_values
        self.image_grid_thw = image_grid_thw


T = TypeVar("T")


def to_device(batch: T, device) -> T:
    """A copy of a dataclass (``MicroBatch``, ``RowInfo``) with every tensor field on ``device``.

    Micro-batches are collated on the CPU (the processor's tensors live there) and must meet the
    model on its device, together with the row info the loss reads (``MicroBatch.rows``). Every
    field is visited (not a list of names), so a field added later moves too; dataclass fields
    (the row info) move recursively, tensors inside dict fields (``RowInfo.metrics``) as well;
    other values are kept.
    """
    device = torch.device(device)
    changes = {}
    for f in dataclasses.fields(batch):
        value = getattr(batch, f.name)
        if isinstance(value, torch.Tensor):
            changes[f.name] = value.to(device, non_blocking=True)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            changes[f.name] = to_device(value, device)
        elif isinstance(value, dict) and any(isinstance(v, torch.Tensor) for v in value.values()):
            changes[f.name] = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                               for k, v in value.items()}
    return dataclasses.replace(batch, **changes)


def sequence_multiple(tp: int, sequence_parallel: bool, fp8: bool) -> int:
    """What every micro-batch's padded length S must be a multiple of.

    Sequence parallel splits S over tp ranks (S % tp == 0). Transformer Engine's FP8 GEMMs check
    each linear's local input before the sequence-parallel all-gather, [S/tp * B, H] (``specs.
    fp8_gemm_shape_ok``: rows % 8, H % 16, H being the model's), so S/tp * B % 8 == 0 (S * B without
    SP) for any micro-batch size B: S/tp (or S) itself is padded to a multiple of 8.
    """
    if tp < 1:
        raise ValueError(f"tensor parallel size must be >= 1, got {tp}")
    split = tp if sequence_parallel else 1
    return split * (FP8_ROWS_MULTIPLE if fp8 else 1)


def gt_response_ids(tokenizer, text: str, end_of_turn_id: int) -> list[int]:
    """Token ids of a rendered GT answer, closed by the end-of-turn token as a finished rollout is."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return list(ids) + [end_of_turn_id]


def collate(
    rows: Sequence[Row],
    row_indices: Sequence[int],
    prompts: Sequence[PreparedPrompt],
    *,
    image_token_id: int,
    pad_id: int,
    spatial_merge_size: int = 2,
    seq_length: Optional[int] = None,
    micro_batch_size: Optional[int] = None,
) -> MicroBatch:
    """Right-padded micro-batch of ``rows[row_indices]``; optional fixed shape for pipeline p2p.

    Padding rows (to reach ``micro_batch_size``) repeat the first row with an all-zero loss mask, so
    they are valid model input and contribute nothing.
    """
    chosen = list(row_indices)
    if not chosen:
        raise ValueError("a micro-batch needs at least one row")
    index = chosen + [-1] * max(0, (micro_batch_size or len(chosen)) - len(chosen))
    sources = [rows[i] if i >= 0 else rows[chosen[0]] for i in index]
    seqs = [torch.cat([prompts[r.prompt].input_ids, torch.tensor(r.response_ids, dtype=torch.long)]) for r in sources]
    longest = max(len(s) for s in seqs)
    length = seq_length or longest
    if longest > length:
        raise ValueError(f"a row of {longest} tokens does not fit the micro-batch length {length}")
    batch = len(seqs)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    attention = torch.zeros(batch, length, dtype=torch.long)
    loss_mask = torch.zeros(batch, length)
    for b, (seq, row, idx) in enumerate(zip(seqs, sources, index)):
        input_ids[b, : len(seq)] = seq
        attention[b, : len(seq)] = 1
        if idx >= 0:
            prompt_len = len(prompts[row.prompt].input_ids)
            # Position t predicts token t+1: response tokens are predicted from prompt_len-1 on.
            loss_mask[b, prompt_len - 1 : len(seq) - 1] = 1.0
    labels = torch.roll(input_ids, -1, dims=1)
    labels[:, -1] = pad_id
    # Text-only prompts (no pixels) may sit next to prompts with images.
    with_images = [prompts[r.prompt] for r in sources if prompts[r.prompt].has_images]
    pixel_values = torch.cat([p.pixel_values for p in with_images]) if with_images else None
    image_grid_thw = torch.cat([p.image_grid_thw for p in with_images]) if with_images else None
    position_ids, _ = mrope_position_ids(
        input_ids, image_grid_thw, image_token_id=image_token_id, spatial_merge_size=spatial_merge_size,
        attention_mask=attention,
    )
    return MicroBatch(input_ids, labels, loss_mask, position_ids, pixel_values, image_grid_thw,
                      torch.tensor(index, dtype=torch.long))


def plan_micro_batches(num_rows: int, micro_batch_size: int) -> list[list[int]]:
    return [list(range(i, min(i + micro_batch_size, num_rows))) for i in range(0, num_rows, micro_batch_size)]


def padded_length(rows: Sequence[Row], prompts: Sequence[PreparedPrompt], multiple: int = 1) -> int:
    """One length for every micro-batch of the step (pipeline p2p needs a fixed shape)."""
    longest = max(len(prompts[r.prompt].input_ids) + len(r.response_ids) for r in rows)
    return -(-longest // multiple) * multiple
