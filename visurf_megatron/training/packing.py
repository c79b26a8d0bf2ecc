"""Token-budget micro-batches of packed rows (DESIGN.md, "Pay only for real tokens").

The padded layout (``batching.collate``) gives every row the length of the update's longest row.
With ``train.max_tokens_per_micro_batch`` set, a micro-batch is instead one stream of whole rows
(never split) followed by padding up to the budget:

* each row attends only to itself, causally: the stream reaches attention as THD ``cu_seqlens``
  (Transformer Engine: varlen attention; local spec: megatron's attention run per row, see
  ``models.qwen2_5_vl.packing``);
* each row has its own 3-row mrope positions, restarting at 0 (exactly the padded row's);
* each distinct prompt's images are encoded once per update (``train.shared_vision_pass``, the
  default; ``SharedVision``, run by ``forward.run_micro_batches``) or once per micro-batch that
  holds one of its rows, and their embeddings gathered into every row of its group
  (``image_embed_index``), so the gradients of all those rows flow into that one vision pass;
* every micro-batch of an update has the same stream length T (pipeline p2p needs one shape): the
  longest packed stream of the update, never more than the budget (a longer row excepted), rounded
  up to ``batching.sequence_multiple`` (sequence parallel, FP8). A budget the update does not fill
  is not paid for;
* what the loss reads stays per row ([R, L], L the padded layout's length): ``forward`` gathers
  the stream's log-probs into that layout, so losses and normalisers are the padded ones.

Rows go to micro-batches by token count (largest first, each to the least-loaded micro-batch it fits,
preferring one that already holds its prompt), and the number of micro-batches is agreed across
data-parallel ranks (all-reduce MAX); a rank with fewer rows gets filler micro-batches that
contribute nothing.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from visurf_megatron.models.qwen2_5_vl.rope import image_token_counts, mrope_position_ids

from .batching import MicroBatch, PreparedPrompt, Row, SharedVision, collate, padded_length, plan_micro_batches


def row_length(row: Row, prompts: Sequence[PreparedPrompt]) -> int:
    return len(prompts[row.prompt].input_ids) + len(row.response_ids)


def stream_length(lengths: Sequence[int], budget: int, multiple: int = 1) -> int:
    """The most tokens a packed stream may hold: the budget, or the longest row if a row is longer
    (a row is never split), rounded up to ``multiple``."""
    if budget < 1:
        raise ValueError(f"train.max_tokens_per_micro_batch must be >= 1 to pack, got {budget}")
    longest = max(lengths, default=1)
    return -(-max(budget, longest) // multiple) * multiple


def assign_rows(lengths: Sequence[int], groups: Sequence[int], capacity: int,
                num_bins: int) -> Optional[list[list[int]]]:
    """Positions of ``lengths`` in ``num_bins`` bins of ``capacity`` tokens, or None if one does not fit.

    Longest first, each row to the least-loaded bin it fits; a bin already holding a row of the
    same group (prompt) is preferred while its load is within one longest row of the least, so the
    group shares a vision pass at little cost to the balance. Rows keep their order inside a bin.
    """
    bins: list[list[int]] = [[] for _ in range(num_bins)]
    load = [0] * num_bins
    held: list[set] = [set() for _ in range(num_bins)]
    slack = max(lengths, default=0)
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [b for b in range(num_bins) if load[b] + lengths[i] <= capacity]
        if not fits:
            return None
        least = min(fits, key=lambda b: (load[b], b))
        shared = [b for b in fits if groups[i] in held[b] and load[b] <= load[least] + slack]
        b = min(shared, key=lambda b: (load[b], b)) if shared else least
        bins[b].append(i)
        load[b] += lengths[i]
        held[b].add(groups[i])
    return [sorted(b) for b in bins]


def plan_packed(lengths: Sequence[int], groups: Sequence[int], capacity: int, group=None) -> list[list[int]]:
    """Bins (positions into ``lengths``) for one update; as many on every rank of ``group`` (DP).

    The local count is the fewest bins the assignment fills (from the token lower bound up); the
    agreed count is the maximum over ``group``. Bins that stay empty become filler micro-batches.
    """
    if any(n > capacity for n in lengths):
        raise ValueError(f"a row of {max(lengths)} tokens does not fit a packed stream of {capacity}")
    n = max(1, -(-sum(lengths) // capacity))
    while (bins := assign_rows(lengths, groups, capacity, n)) is None:
        n += 1
    if group is not None and dist.get_world_size(group) > 1:
        count = torch.tensor([n], dtype=torch.long)  # CPU: the DP group carries gloo for CPU tensors
        dist.all_reduce(count, op=dist.ReduceOp.MAX, group=group)
        agreed = int(count)
        if agreed > n:
            # Spread over the agreed count when the assignment fits, else keep ours plus fillers.
            bins = assign_rows(lengths, groups, capacity, agreed) or bins + [[] for _ in range(agreed - n)]
    return bins


def collate_packed(
    rows: Sequence[Row],
    row_indices: Sequence[int],
    prompts: Sequence[PreparedPrompt],
    *,
    image_token_id: int,
    pad_id: int,
    spatial_merge_size: int = 2,
    seq_length: int,
    row_width: int,
    filler: Optional[int] = None,
    shared: Optional[tuple[SharedVision, dict[int, int]]] = None,
) -> MicroBatch:
    """One packed stream [1, seq_length] of ``rows[row_indices]``; loss fields per row [R, row_width].

    With no rows, a filler micro-batch: ``rows[filler]`` as valid input, row index -1, loss mask 0.
    ``shared``: the update's ``SharedVision`` and each prompt's first row in its output
    (``shared_vision``); without it the micro-batch carries its own prompts' images.
    """
    chosen = list(row_indices)
    if not chosen:
        if filler is None:
            raise ValueError("a packed micro-batch needs rows, or a filler row to stand in for none")
        chosen = [filler]
    sources = [rows[i] for i in chosen]
    seqs = [torch.cat([prompts[r.prompt].input_ids, torch.tensor(r.response_ids, dtype=torch.long)]) for r in sources]
    total = sum(len(s) for s in seqs)
    if total > seq_length:
        raise ValueError(f"rows of {total} tokens in all do not fit a packed stream of {seq_length}")
    longest = max(len(s) for s in seqs)
    if longest > row_width:
        raise ValueError(f"a row of {longest} tokens does not fit the per-row width {row_width}")
    input_ids = torch.full((1, seq_length), pad_id, dtype=torch.long)
    position_ids = torch.zeros(3, 1, seq_length, dtype=torch.long)  # padding tail: 0, as padded rows
    loss_mask = torch.zeros(len(seqs), row_width)
    pack_index = torch.zeros(len(seqs), row_width, dtype=torch.long)
    offsets = [0]
    # prompt -> its first row in the vision output (the update's, or this micro-batch's own)
    vision_start: dict[int, int] = dict(shared[1]) if shared else {}
    pixels, grids, embed_index = [], [], []
    vision_rows = 0
    for r, (seq, row) in enumerate(zip(seqs, sources)):
        prompt = prompts[row.prompt]
        start, n = offsets[-1], len(seq)
        input_ids[0, start:start + n] = seq
        grid = prompt.image_grid_thw if prompt.has_images else None
        # Positions of the row alone: they restart at 0 for every row, as in its own padded row.
        pos, _ = mrope_position_ids(seq.unsqueeze(0), grid, image_token_id=image_token_id,
                                    spatial_merge_size=spatial_merge_size)
        position_ids[:, 0, start:start + n] = pos[:, 0]
        pack_index[r, :n] = torch.arange(start, start + n)
        # Position t predicts token t+1: response tokens are predicted from prompt_len-1 on.
        loss_mask[r, len(prompt.input_ids) - 1 : n - 1] = 1.0
        if grid is not None:
            slots = sum(image_token_counts(grid, spatial_merge_size))
            if row.prompt not in vision_start:  # the prompt's images: once in this micro-batch
                vision_start[row.prompt] = vision_rows
                pixels.append(prompt.pixel_values)
                grids.append(grid)
                vision_rows += slots
            embed_index.append(torch.arange(vision_start[row.prompt], vision_start[row.prompt] + slots))
        offsets.append(start + n)
    if offsets[-1] < seq_length:  # the padding tail is a segment of its own (attends to itself only)
        offsets.append(seq_length)
    labels = torch.roll(input_ids, -1, dims=1)
    labels[:, -1] = pad_id
    index = torch.tensor(chosen if row_indices else [-1], dtype=torch.long)
    if not row_indices:
        loss_mask.zero_()
    cu = torch.tensor(offsets, dtype=torch.int32)
    return MicroBatch(
        input_ids, labels, loss_mask, position_ids,
        torch.cat(pixels) if pixels else None, torch.cat(grids) if grids else None, index,
        pack_index=pack_index, cu_seqlens=cu, max_seqlen=int((cu[1:] - cu[:-1]).max()),
        image_embed_index=torch.cat(embed_index) if embed_index else None,
        shared_vision=shared[0] if shared and embed_index else None,
    )


def shared_vision(rows: Sequence[Row], indices: Sequence[int], prompts: Sequence[PreparedPrompt],
                  spatial_merge_size: int) -> Optional[tuple[SharedVision, dict[int, int]]]:
    """The images of the distinct prompts of ``rows[indices]`` (first appearance order) in one
    batch, and each prompt's first row in its vision output; None when no prompt has images."""
    start: dict[int, int] = {}
    pixels, grids, offset = [], [], 0
    for i in indices:
        p = rows[i].prompt
        if p in start or not prompts[p].has_images:
            continue
        start[p] = offset
        pixels.append(prompts[p].pixel_values)
        grids.append(prompts[p].image_grid_thw)
        offset += sum(image_token_counts(prompts[p].image_grid_thw, spatial_merge_size))
    if not start:
        return None
    return SharedVision(torch.cat(pixels), torch.cat(grids)), start


def build_micro_batches(
    rows: Sequence[Row],
    indices: Sequence[int],
    prompts: Sequence[PreparedPrompt],
    *,
    image_token_id: int,
    pad_id: int,
    spatial_merge_size: int,
    micro_batch_size: int,
    max_tokens: Optional[int] = None,
    multiple: int = 1,
    row_width: Optional[int] = None,
    group=None,
    share_vision: bool = True,
) -> list[MicroBatch]:
    """The micro-batches of ``rows[indices]``: padded (``micro_batch_size`` rows each) when
    ``max_tokens`` is off, else packed streams of ``max_tokens`` (see the module doc).

    ``row_width``: the per-row length L (default: the padded length of these rows); pass the whole
    update's so that every mini-batch sees the same one. ``group``: the data-parallel group whose
    ranks must agree on the number of packed micro-batches (None: no agreement needed).
    ``share_vision``: packed micro-batches encode each prompt's images once for all of them.
    """
    indices = list(indices)
    if not indices:
        raise ValueError("no rows to build micro-batches from")
    width = row_width or padded_length([rows[i] for i in indices], prompts, multiple)
    common = dict(image_token_id=image_token_id, pad_id=pad_id, spatial_merge_size=spatial_merge_size)
    if not max_tokens:
        return [collate(rows, [indices[i] for i in chunk], prompts, seq_length=width,
                        micro_batch_size=micro_batch_size, **common)
                for chunk in plan_micro_batches(len(indices), micro_batch_size)]
    lengths = [row_length(rows[i], prompts) for i in indices]
    bins = plan_packed(lengths, [rows[i].prompt for i in indices], stream_length(lengths, max_tokens), group)
    fullest = max(sum(lengths[j] for j in chunk) for chunk in bins)
    seq_length = -(-fullest // multiple) * multiple
    shared = shared_vision(rows, indices, prompts, spatial_merge_size) if share_vision else None
    return [collate_packed(rows, [indices[j] for j in chunk], prompts, seq_length=seq_length, row_width=width,
                           filler=indices[0], shared=shared, **common)
            for chunk in bins]


def unpack_rows(stream: torch.Tensor, pack_index: torch.Tensor) -> torch.Tensor:
    """Per-token values of a packed stream [1, T] in the per-row layout [R, L] (differentiable)."""
    return stream.reshape(-1)[pack_index]
