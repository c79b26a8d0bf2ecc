"""Packed micro-batches, pure parts: the row assignment, one stream's layout, the attention mask."""
import pytest
import torch

from visurf_megatron.config import ConfigError, from_dict
from visurf_megatron.models.qwen2_5_vl.packing import packed_attention_inputs
from visurf_megatron.training.batching import PreparedPrompt, Row, collate
from visurf_megatron.training.packing import assign_rows, build_micro_batches, collate_packed, stream_length

IMAGE = 9


def _prompts():
    def prompt(ids, grid):
        grid = torch.tensor(grid) if grid else None
        pixels = torch.randn(int(grid.prod(-1).sum()), 8) if grid is not None else None
        return PreparedPrompt(sample_id="s", text="", images=[], input_ids=torch.tensor(ids), pixel_values=pixels,
                              image_grid_thw=grid)
    # 0 images; 1 image of 4x4 patches (4 merged tokens); 2 images (1 and 2 merged tokens)
    return [prompt([1, 2, 3], None), prompt([1, IMAGE, IMAGE, IMAGE, IMAGE, 2], [[1, 4, 4]]),
            prompt([IMAGE, 3, IMAGE, IMAGE, 4], [[1, 2, 2], [1, 2, 4]])]


def _rows():
    return [Row(prompt=p, response_ids=list(range(10, 10 + n)), is_gt=j == 1)
            for p, lens in enumerate([(2, 5), (3, 1), (4, 2)]) for j, n in enumerate(lens)]


def test_assign_rows_places_every_row_once_within_capacity_balanced():
    lengths = [40, 35, 30, 30, 20, 10, 10, 5]
    bins = assign_rows(lengths, [0, 0, 1, 1, 2, 2, 3, 3], 64, 3)
    assert sorted(i for b in bins for i in b) == list(range(8))
    loads = [sum(lengths[i] for i in b) for b in bins]
    assert max(loads) <= 64 and max(loads) - min(loads) <= max(lengths)
    assert assign_rows(lengths, [0] * 8, 64, 2) is None  # 180 tokens cannot fit 2 x 64
    # Same-prompt rows share a bin when the balance allows it (one vision pass for both).
    bins = assign_rows([10, 10, 10, 10], [0, 1, 0, 1], 40, 2)
    assert sorted(map(sorted, bins)) == [[0, 2], [1, 3]]


def test_stream_length_is_the_budget_rounded_up_or_the_longest_row():
    assert stream_length([10, 20], 100, 1) == 100
    assert stream_length([10, 20], 100, 16) == 112
    assert stream_length([10, 130], 100, 8) == 136  # a row is never split
    with pytest.raises(ValueError, match="max_tokens_per_micro_batch"):
        stream_length([10], 0)


def test_packed_stream_layout_matches_the_padded_rows():
    prompts, rows = _prompts(), _rows()
    kw = dict(image_token_id=IMAGE, pad_id=0, spatial_merge_size=2)
    chosen = [0, 2, 3, 5]  # prompts 0, 1, 1, 2: rows 2 and 3 share prompt 1's images
    mb = collate_packed(rows, chosen, prompts, seq_length=48, row_width=12, **kw)
    ref = collate(rows, chosen, prompts, seq_length=12, **kw)
    lens = [len(prompts[rows[i].prompt].input_ids) + len(rows[i].response_ids) for i in chosen]
    assert mb.input_ids.shape == (1, 48) and mb.position_ids.shape == (3, 1, 48)
    assert mb.cu_seqlens.tolist() == [0, 5, 14, 21, 28, 48] and mb.max_seqlen == 20  # rows, then the tail
    assert torch.equal(mb.loss_mask, ref.loss_mask) and torch.equal(mb.row_index, ref.row_index)
    for r, n in enumerate(lens):
        at = mb.pack_index[r, :n]
        assert torch.equal(mb.input_ids[0, at], ref.input_ids[r, :n])
        assert torch.equal(mb.labels[0, at[:-1]], ref.labels[r, : n - 1])
        # mrope positions restart with every row: those of the row on its own
        assert torch.equal(mb.position_ids[:, 0, at], ref.position_ids[:, r, :n])
    assert (mb.position_ids[:, 0, 28:] == 0).all()
    # Prompt 1's image encoded once (4 + 3 tokens for prompts 1 and 2) and gathered into both its rows.
    assert mb.image_grid_thw.tolist() == [[1, 4, 4], [1, 2, 2], [1, 2, 4]]
    assert mb.pixel_values.shape[0] == 16 + 4 + 8
    assert mb.image_embed_index.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6]
    assert int((mb.input_ids == IMAGE).sum()) == len(mb.image_embed_index)


def test_filler_micro_batch_contributes_nothing():
    prompts, rows = _prompts(), _rows()
    mb = collate_packed(rows, [], prompts, image_token_id=IMAGE, pad_id=0, seq_length=16, row_width=12, filler=1)
    assert mb.row_index.tolist() == [-1] and mb.loss_mask.sum() == 0 and mb.packed


def test_build_micro_batches_padded_by_default_packed_with_a_budget():
    prompts, rows = _prompts(), _rows()
    kw = dict(image_token_id=IMAGE, pad_id=0, spatial_merge_size=2, micro_batch_size=2, multiple=4)
    padded = build_micro_batches(rows, range(6), prompts, **kw)
    assert [mb.packed for mb in padded] == [False] * 3 and padded[0].input_ids.shape == (2, 12)
    packed = build_micro_batches(rows, range(6), prompts, max_tokens=21, **kw)
    # 45 tokens in 3 streams of at most 21: one shape, the fullest stream's, rounded up to 4
    fullest = max(int(mb.cu_seqlens[mb.row_index.numel()]) for mb in packed)
    assert len(packed) == 3 and fullest <= 21
    assert all(mb.packed and mb.input_ids.shape == (1, -(-fullest // 4) * 4) for mb in packed)
    assert sorted(r for mb in packed for r in mb.row_index.tolist()) == list(range(6))
    assert all(mb.loss_mask.shape[1] == 12 for mb in packed)  # the padded layout's row width


@pytest.mark.parametrize("backend", ["te", "local"])
def test_both_backends_get_thd_params_and_fused_rope_is_refused(backend):
    class Cfg:  # the two TransformerConfig fields read
        apply_rope_fusion = False
        context_parallel_size = 1

    mask, params = packed_attention_inputs(torch.tensor([0, 3, 8]), 5, 8, backend=backend, config=Cfg())
    assert mask is None and params.qkv_format == "thd" and params.cu_seqlens_q.dtype == torch.int32
    assert params.cu_seqlens_q.tolist() == [0, 3, 8] and params.max_seqlen_kv == 5
    Cfg.apply_rope_fusion = True
    with pytest.raises(ValueError, match="apply_rope_fusion"):
        packed_attention_inputs(torch.tensor([0, 3, 8]), 5, 8, backend=backend, config=Cfg())


def test_budget_config_is_validated():
    assert from_dict({}).train.max_tokens_per_micro_batch == 0
    with pytest.raises(ConfigError, match="train.max_tokens_per_micro_batch"):
        from_dict({"train": {"max_tokens_per_micro_batch": -1}})
