"""models/qwen2_5_vl/rope.py: 3-row mrope position ids == transformers' Qwen2_5_VLModel.get_rope_index."""
import pytest
import torch

from tests.qwen_fixtures import build_checkpoint
from visurf_megatron.models.qwen2_5_vl.rope import RopeIndexError, mrope_position_ids


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    from transformers import Qwen2_5_VLForConditionalGeneration

    d = build_checkpoint(tmp_path_factory.mktemp("rope"), "untied")
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(d).eval()


@pytest.fixture(scope="module")
def ids(hf_model):
    cfg = hf_model.config
    return {"image": cfg.image_token_id, "video": cfg.video_token_id, "start": cfg.vision_start_token_id,
            "end": cfg.vision_end_token_id, "merge": cfg.vision_config.spatial_merge_size, "pad": 0}


def _image(ids, grid):
    t, h, w = grid
    return [ids["start"]] + [ids["image"]] * (t * h * w // ids["merge"] ** 2) + [ids["end"]]


def _batch(rows, pad):
    """Right-pad token lists into (input_ids, attention_mask)."""
    seq = max(len(r) for r in rows)
    input_ids = torch.tensor([r + [pad] * (seq - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (seq - len(r)) for r in rows])
    return input_ids, mask


def _ours(ids, input_ids, grids, mask=None):
    grid_thw = None if grids is None else torch.tensor(grids)
    return mrope_position_ids(input_ids, grid_thw, image_token_id=ids["image"], spatial_merge_size=ids["merge"],
                              attention_mask=mask, video_token_id=ids["video"])


def _reference(hf_model, ids, input_ids, grids, mask=None):
    mm = (input_ids == ids["image"]).long()
    grid_thw = None if grids is None else torch.tensor(grids)
    with torch.no_grad():
        pos, deltas = hf_model.model.get_rope_index(input_ids, mm, grid_thw, attention_mask=mask)
    return pos, deltas.reshape(-1)


def _compare(hf_model, ids, input_ids, grids, mask=None):
    pos, deltas = _ours(ids, input_ids, grids, mask)
    ref_pos, ref_deltas = _reference(hf_model, ids, input_ids, grids, mask)
    assert pos.shape == (3, *input_ids.shape)
    real = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
    assert torch.equal(pos[:, real], ref_pos[:, real]), (pos, ref_pos)
    assert torch.equal(pos[:, ~real], torch.zeros_like(pos[:, ~real]))  # padding: position 0 in every row
    assert deltas.tolist() == ref_deltas.tolist()
    return pos, deltas


def test_one_image_by_hand(ids):
    # 2 text tokens, a (1, 4, 6) patch grid = 2 x 3 merged tokens, 2 text tokens.
    input_ids = torch.tensor([[7, 8] + [ids["image"]] * 6 + [9, 10]])
    pos, deltas = _ours(ids, input_ids, [[1, 4, 6]])
    assert pos[:, 0].tolist() == [
        [0, 1, 2, 2, 2, 2, 2, 2, 5, 6],  # temporal
        [0, 1, 2, 2, 2, 3, 3, 3, 5, 6],  # height
        [0, 1, 2, 3, 4, 2, 3, 4, 5, 6],  # width; text resumes at 2 + max(2, 3)
    ]
    assert deltas.tolist() == [7 - 10]


def test_text_only_matches_transformers(hf_model, ids):
    input_ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17, 18]])
    pos, deltas = _compare(hf_model, ids, input_ids, None)
    assert pos[1, 1].tolist() == list(range(7)) and deltas.tolist() == [0, 0]


def test_one_image_matches_transformers(hf_model, ids):
    rows = [[1, 2, 3] + _image(ids, (1, 4, 6)) + [4, 5, 6, 7]]
    _compare(hf_model, ids, torch.tensor(rows), [[1, 4, 6]])


def test_two_images_of_different_grids_in_one_sample(hf_model, ids):
    grids = [[1, 6, 4], [1, 2, 8]]
    rows = [[1, 2] + _image(ids, grids[0]) + [3, 4, 5] + _image(ids, grids[1]) + [6]]
    pos, deltas = _compare(hf_model, ids, torch.tensor(rows), grids)
    assert deltas.item() < 0  # images advance positions by max(h, w)/m, less than their token count


def test_padded_batch_with_different_image_counts(hf_model, ids):
    grids = [[1, 4, 4], [1, 8, 6], [1, 2, 2], [1, 6, 10]]  # sample 0: two images, 1: none, 2: one, 3: one
    rows = [
        [1, 2] + _image(ids, grids[0]) + [3] + _image(ids, grids[1]) + [4, 5],
        [6, 7, 8, 9],
        [10] + _image(ids, grids[2]) + [11, 12, 13, 14, 15, 16],
        _image(ids, grids[3]) + [17],
    ]
    input_ids, mask = _batch(rows, ids["pad"])
    pos, deltas = _compare(hf_model, ids, input_ids, grids, mask)
    assert deltas[1].item() == 0


def test_image_placeholder_count_must_match_grid(ids):
    short = torch.tensor([[1] + [ids["image"]] * 5 + [2]])  # grid (1,4,6) needs 6 tokens
    with pytest.raises(RopeIndexError, match=r"needs 6 consecutive image tokens"):
        _ours(ids, short, [[1, 4, 6]])
    with pytest.raises(RopeIndexError, match="more image placeholders than image grids"):
        _ours(ids, torch.tensor([[1] + [ids["image"]] * 6 + [2] + [ids["image"]]]), [[1, 4, 6]])


def test_more_grids_than_images(ids):
    with pytest.raises(RopeIndexError, match=r"2 image grids given but only 1 images"):
        _ours(ids, torch.tensor([[1] + [ids["image"]] * 6 + [2]]), [[1, 4, 6], [1, 2, 2]])
    with pytest.raises(RopeIndexError, match=r"1 image grids given but only 0"):
        _ours(ids, torch.tensor([[1, 2, 3]]), [[1, 2, 2]])


def test_video_tokens_are_refused(ids):
    with pytest.raises(RopeIndexError, match="video"):
        _ours(ids, torch.tensor([[1, ids["video"], ids["video"], 2]]), None)


def test_input_must_be_batched(ids):
    with pytest.raises(RopeIndexError, match=r"\[B, S\]"):
        _ours(ids, torch.tensor([1, 2, 3]), None)
