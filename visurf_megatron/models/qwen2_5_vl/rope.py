"""3-row multimodal RoPE position ids for Qwen2.5-VL (transformers' ``get_rope_index`` semantics).

Text tokens advance all three rows (temporal, height, width) together by one. An image of grid
(t, h, w) patches becomes (t, h/m, w/m) merged tokens at positions
``(start + t_idx, start + h_idx, start + w_idx)``; the text after it resumes at
``start + max(h/m, w/m)`` (for one temporal frame), i.e. one past the image's largest position.
"""
from __future__ import annotations

from typing import Optional

import torch


class RopeIndexError(ValueError):
    """The token sequence and the image grids disagree."""


def image_token_counts(grid_thw: torch.Tensor, spatial_merge_size: int) -> list[int]:
    """Merged tokens per image: t * h * w / m^2."""
    return [int(t * h * w) // (spatial_merge_size**2) for t, h, w in grid_thw.tolist()]


def _image_positions(start: int, t: int, h: int, w: int) -> torch.Tensor:
    tt = torch.arange(t).view(t, 1, 1).expand(t, h, w)
    hh = torch.arange(h).view(1, h, 1).expand(t, h, w)
    ww = torch.arange(w).view(1, 1, w).expand(t, h, w)
    return torch.stack([tt, hh, ww]).reshape(3, -1) + start


def mrope_position_ids(
    input_ids: torch.Tensor,
    image_grid_thw: Optional[torch.Tensor],
    *,
    image_token_id: int,
    spatial_merge_size: int = 2,
    attention_mask: Optional[torch.Tensor] = None,
    video_token_id: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids [3, B, S] and rope deltas [B] (max position + 1 - real length).

    Images are consumed from ``image_grid_thw`` in batch-major order of appearance, as the processor
    emits them. Padding positions (``attention_mask == 0``) get position 0 in every row.
    """
    if input_ids.dim() != 2:
        raise RopeIndexError(f"input_ids must be [B, S], got shape {tuple(input_ids.shape)}")
    if video_token_id is not None and bool((input_ids == video_token_id).any()):
        raise RopeIndexError("video inputs are not supported yet")
    batch, seq = input_ids.shape
    grids = [] if image_grid_thw is None else [tuple(int(x) for x in g) for g in image_grid_thw.tolist()]
    position_ids = torch.zeros(3, batch, seq, dtype=torch.long)
    deltas = torch.zeros(batch, dtype=torch.long)
    next_grid = 0
    for b in range(batch):
        keep = torch.ones(seq, dtype=torch.bool) if attention_mask is None else attention_mask[b].bool()
        tokens = input_ids[b][keep].tolist()
        pieces: list[torch.Tensor] = []
        cur, i = 0, 0
        while i < len(tokens):
            if tokens[i] != image_token_id:
                j = i
                while j < len(tokens) and tokens[j] != image_token_id:
                    j += 1
                pieces.append(torch.arange(cur, cur + j - i).expand(3, -1))
                cur += j - i
                i = j
                continue
            if next_grid >= len(grids):
                raise RopeIndexError(f"sample {b}: more image placeholders than image grids ({len(grids)})")
            t, h, w = grids[next_grid]
            next_grid += 1
            lh, lw = h // spatial_merge_size, w // spatial_merge_size
            n = t * lh * lw
            if tokens[i : i + n] != [image_token_id] * n:
                raise RopeIndexError(
                    f"sample {b}: image {next_grid - 1} with grid {(t, h, w)} needs {n} consecutive image tokens"
                )
            pieces.append(_image_positions(cur, t, lh, lw))
            cur += max(t, lh, lw)
            i += n
        positions = torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)
        position_ids[:, b, keep] = positions
        deltas[b] = (int(positions.max()) + 1 if positions.numel() else 0) - len(tokens)
    if next_grid != len(grids):
        raise RopeIndexError(f"{len(grids)} image grids given but only {next_grid} images found in input_ids")
    return position_ids, deltas
