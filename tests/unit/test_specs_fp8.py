"""models/qwen2_5_vl/{specs,vision,model}.py: backend choice, layer specs, FP8 fields, vision index
helpers (hand-drawn), and Qwen25VLModel.freeze in a real 1-rank megatron world."""
import copy

import pytest
import torch
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType

from tests.qwen_fixtures import build_batch, build_checkpoint
from tests.unit.test_qwen_config import HUB
from visurf_megatron.models.local_spec import RMSNorm
from visurf_megatron.models.qwen2_5_vl.config import ParallelLayout, configs_from_hf
from visurf_megatron.models.qwen2_5_vl.specs import (
    fp8_overrides,
    language_layer_spec,
    select_backend,
    transformer_engine_available,
    vision_layer_spec,
)
from visurf_megatron.models.qwen2_5_vl.vision import (
    PerTokenRotarySelfAttention,
    block_diagonal_mask,
    build_vision_layout,
    patch_hw_positions,
    window_order,
)

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallbacks")

# --------------------------------------------------------------------------------------------
# Backend and specs


@cpu_only
def test_backend_selection_on_cpu():
    assert transformer_engine_available() is False
    assert select_backend("auto") == "local" and select_backend() == "local"
    assert select_backend("local") == "local"
    with pytest.raises(RuntimeError, match="needs CUDA and transformer-engine"):
        select_backend("te")


def test_unknown_backend_is_value_error():
    with pytest.raises(ValueError, match="unknown layer spec 'bogus'; choose auto, local or te"):
        select_backend("bogus")


def test_local_specs():
    vision = vision_layer_spec("local")
    attn = vision.submodules.self_attention
    assert attn.module is PerTokenRotarySelfAttention
    assert attn.params["attn_mask_type"] == AttnMaskType.arbitrary
    assert vision.submodules.input_layernorm is RMSNorm and vision.submodules.pre_mlp_layernorm is RMSNorm
    language = language_layer_spec("local")
    attn = language.submodules.self_attention
    assert attn.module is SelfAttention  # building the vision spec did not change the shared one
    assert attn.params["attn_mask_type"] == AttnMaskType.causal
    assert language.submodules.input_layernorm is RMSNorm and language.submodules.pre_mlp_layernorm is RMSNorm


# --------------------------------------------------------------------------------------------
# FP8


def test_fp8_overrides_fields():
    assert fp8_overrides(None) == {} and fp8_overrides("") == {}
    assert fp8_overrides("hybrid") == {
        "fp8": "hybrid", "fp8_recipe": "tensorwise", "first_last_layers_bf16": True,
        "num_layers_at_start_in_bf16": 1, "num_layers_at_end_in_bf16": 1,
    }
    assert fp8_overrides("e4m3", "blockwise", 2) == {
        "fp8": "e4m3", "fp8_recipe": "blockwise", "first_last_layers_bf16": True,
        "num_layers_at_start_in_bf16": 2, "num_layers_at_end_in_bf16": 2,
    }
    assert fp8_overrides("hybrid", "mxfp8", 0) == {"fp8": "hybrid", "fp8_recipe": "mxfp8"}
    assert fp8_overrides("hybrid", "delayed", 0) == {"fp8": "hybrid", "fp8_recipe": "delayed"}


def test_fp8_overrides_refusals():
    with pytest.raises(ValueError, match="delayed FP8 scaling cannot keep first/last layers in BF16"):
        fp8_overrides("hybrid", "delayed", 1)
    for bad in ("e5m2", "fp8", "HYBRID"):
        with pytest.raises(ValueError, match="fp8 must be hybrid or e4m3"):
            fp8_overrides(bad)


def test_fp8_reaches_the_language_config_only():
    # megatron's TransformerConfig accepts these FP8 fields on CPU (nothing runs in FP8 here).
    lang, vis, _ = configs_from_hf(copy.deepcopy(HUB["7B"]), ParallelLayout(tp=4, pp=2), params_dtype=torch.bfloat16,
                                   **fp8_overrides("hybrid", "tensorwise", 1))
    assert lang.fp8 == "hybrid" and lang.fp8_recipe == "tensorwise" and lang.bf16
    assert lang.first_last_layers_bf16 is True
    assert lang.num_layers_at_start_in_bf16 == 1 and lang.num_layers_at_end_in_bf16 == 1
    assert vis.fp8 is None and vis.first_last_layers_bf16 is False and vis.bf16  # vision stays BF16
    # opt-in FP8 vision on a vision geometry TE can run in FP8 (MLP 3456 wide): FP8 fields, but the
    # BF16 layer counts stay language-only
    fp8_ready = copy.deepcopy(HUB["7B"])
    fp8_ready["vision_config"]["intermediate_size"] = 3456
    _, vis, _ = configs_from_hf(fp8_ready, ParallelLayout(tp=4), params_dtype=torch.bfloat16,
                                fp8_vision=True, **fp8_overrides("e4m3", "tensorwise", 2))
    assert vis.fp8 == "e4m3" and vis.fp8_recipe == "tensorwise" and vis.first_last_layers_bf16 is False
    # non-FP8 overrides still reach both towers
    lang, vis, _ = configs_from_hf(copy.deepcopy(HUB["7B"]), recompute_granularity="full",
                                   recompute_method="uniform", recompute_num_layers=1)
    assert lang.recompute_granularity == vis.recompute_granularity == "full"


# --------------------------------------------------------------------------------------------
# Vision index helpers (patch 14, merge 2)


def test_window_order_hand_drawn():
    # One image of 6x10 patches = a 3x5 grid of merge units, windows of 56 px = 2x2 units:
    #    0  1 |  2  3 |  4
    #    5  6 |  7  8 |  9
    #   ------+-------+---
    #   10 11 | 12 13 | 14
    # then a 4x4-patch image (2x2 units 15..18) = one window.
    order, cu = window_order(torch.tensor([[1, 6, 10], [1, 4, 4]]), merge=2, window_size=56, patch_size=14)
    assert order.tolist() == [0, 1, 5, 6, 2, 3, 7, 8, 4, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]
    assert cu.tolist() == [0, 16, 32, 40, 48, 56, 60, 76]  # 4 patches per unit
    assert cu.dtype == torch.int32
    # a window larger than the image: one window per frame; two frames
    order, cu = window_order(torch.tensor([[2, 4, 4]]), merge=2, window_size=112, patch_size=14)
    assert order.tolist() == list(range(8)) and cu.tolist() == [0, 16, 32]
    with pytest.raises(ValueError, match="smaller than one merge unit"):
        window_order(torch.tensor([[1, 4, 4]]), merge=2, window_size=14, patch_size=14)


@pytest.mark.parametrize("grids,window", [([[1, 6, 10], [1, 4, 4]], 56), ([[2, 8, 12]], 56), ([[1, 10, 6], [1, 16, 16]], 112)])
def test_vision_index_helpers_match_transformers(grids, window):
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    grid = torch.tensor(grids)
    order, cu = window_order(grid, 2, window, 14)
    ref_order, ref_cu = get_vision_window_index(grid, spatial_merge_size=2, window_size=window, patch_size=14)
    assert torch.equal(order, ref_order) and torch.equal(cu, ref_cu)
    assert torch.equal(patch_hw_positions(grid, 2), get_vision_position_ids(grid, 2))


def test_patch_positions_hand_drawn():
    hw = patch_hw_positions(torch.tensor([[2, 2, 4]]), merge=2)
    one_frame = [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3]]  # 2x2 blocks contiguous
    assert hw.tolist() == one_frame + one_frame


def test_block_diagonal_mask_hand_drawn():
    F_, T_ = False, True
    mask = block_diagonal_mask(torch.tensor([0, 2, 5], dtype=torch.int32), 5)
    assert mask.shape == (1, 1, 5, 5) and mask.dtype == torch.bool
    assert mask[0, 0].tolist() == [[F_, F_, T_, T_, T_],
                                   [F_, F_, T_, T_, T_],
                                   [T_, T_, F_, F_, F_],
                                   [T_, T_, F_, F_, F_],
                                   [T_, T_, F_, F_, F_]]  # True = may not attend
    mask = block_diagonal_mask(torch.tensor([0, 1, 1, 3]), 3)  # an empty segment changes nothing
    assert mask[0, 0].tolist() == [[F_, T_, T_], [T_, F_, F_], [T_, F_, F_]]


def test_vision_layout_reorders_rotary_angles(tmp_path):
    _, _, extras = configs_from_hf(build_checkpoint(tmp_path, "untied"))
    layout = build_vision_layout(torch.tensor([[1, 6, 10], [1, 4, 4]]), extras)
    n = 60 + 16
    assert torch.equal(layout.window_index[layout.reverse_index], torch.arange(19))
    assert layout.cu_image_seqlens.tolist() == [0, 60, 76]
    assert layout.cu_window_seqlens.tolist() == [0, 16, 32, 40, 48, 56, 60, 76]
    head_dim = extras.vision_head_dim
    assert layout.rotary_angles.shape == (n, head_dim)
    # 4 frequencies (head_dim/4) shared by h and w; angles = [h*f, w*f, h*f, w*f]
    inv = 1.0 / (10000.0 ** (torch.arange(0, head_dim // 2, 2, dtype=torch.float) / (head_dim // 2)))

    def angles(h, w):
        return torch.cat([h * inv, w * inv, h * inv, w * inv])

    # window 1 = units 2, 3, 7, 8 = reordered patches 16..31: patch 16 = first patch of unit 2 = (h=0, w=4);
    # patch 27 = last patch of unit 7 (merged row 1, column 2) = (3, 5)
    assert torch.allclose(layout.rotary_angles[16], angles(0, 4))
    assert torch.allclose(layout.rotary_angles[27], angles(3, 5))
    assert torch.allclose(layout.rotary_angles[32], angles(0, 8))  # window 2 (units 4, 9) starts at 32
    assert torch.allclose(layout.rotary_angles[40], angles(4, 0))  # window 3 (units 10, 11) starts at 40
    assert torch.allclose(layout.rotary_angles[60 + 7], angles(1, 3))  # second image, unit 1, patch 3


# --------------------------------------------------------------------------------------------
# freeze, in a real 1-rank gloo world (module-level so spawn can import it)


def _towers(model):
    out = {"vision": set(), "merger": set(), "language": set()}
    for name, p in model.named_parameters():
        tower = ("merger" if name.startswith("vision_model.merger.") else
                 "vision" if name.startswith("vision_model.") else "language")
        out[tower].add(p.requires_grad)
    return {k: sorted(v) for k, v in out.items()}


def freeze_world(hf_dir, batch):
    from tests.distributed.qwen_world import build_model
    from visurf_megatron.models.qwen2_5_vl.model import Qwen25VLModel
    from visurf_megatron.models.qwen2_5_vl.rope import mrope_position_ids

    model, extras, _ = build_model(hf_dir, 1, 1, False)
    states = {"default": _towers(model)}
    for key, flags in {"vision": dict(vision=True), "merger": dict(merger=True), "language": dict(language=True),
                       "vision+merger": dict(vision=True, merger=True), "all": dict(vision=True, merger=True, language=True),
                       "none": {}}.items():
        model.freeze(**flags)
        states[key] = _towers(model)
    lang, vis, ex = configs_from_hf(hf_dir, ParallelLayout())
    states["ctor"] = _towers(Qwen25VLModel(lang, vis, ex, freeze_vision=True, freeze_language=True))
    states["patch_embed"] = model.vision_model.patch_embed.proj.weight.requires_grad
    # Train only the merger: its gradients arrive through the frozen language model.
    model.freeze(vision=True, language=True)
    pos, _ = mrope_position_ids(batch["input_ids"], batch["image_grid_thw"], image_token_id=extras.image_token_id,
                                spatial_merge_size=extras.spatial_merge_size, attention_mask=batch["attention_mask"])
    logp = model(batch["input_ids"], pos, batch["pixel_values"], batch["image_grid_thw"],
                 labels=torch.roll(batch["input_ids"], -1, dims=1))
    (-(logp * batch["attention_mask"]).sum()).backward()
    grads = {}
    for name, p in model.named_parameters():
        tower = "merger" if name.startswith("vision_model.merger.") else "vision" if name.startswith("vision_model.") else "language"
        g = grads.setdefault(tower, {"none": 0, "nonzero": 0, "total": 0})
        g["total"] += 1
        g["none"] += p.grad is None
        g["nonzero"] += p.grad is not None and bool(p.grad.abs().sum() > 0)
    states["grads"] = grads
    return states


def test_freeze_semantics_in_a_one_rank_world(tmp_path):
    from visurf_megatron.runtime.spawn import run_world

    hf_dir = build_checkpoint(tmp_path, "untied")
    (s,) = run_world(freeze_world, 1, hf_dir, build_batch(hf_dir), timeout_s=300)
    on, off = [True], [False]
    assert s["default"] == {"vision": on, "merger": on, "language": on}
    assert s["vision"] == {"vision": off, "merger": on, "language": on}
    assert s["merger"] == {"vision": on, "merger": off, "language": on}
    assert s["language"] == {"vision": on, "merger": on, "language": off}
    assert s["vision+merger"] == {"vision": off, "merger": off, "language": on}
    assert s["all"] == {"vision": off, "merger": off, "language": off}
    assert s["none"] == s["default"]  # freeze() with no flags unfreezes everything
    assert s["ctor"] == {"vision": off, "merger": on, "language": off}
    assert s["patch_embed"] is True
    g = s["grads"]
    assert g["merger"]["nonzero"] == g["merger"]["total"] == 5  # ln_q; fc1 weight, bias; fc2 weight, bias
    assert g["vision"]["none"] == g["vision"]["total"] > 0
    assert g["language"]["none"] == g["language"]["total"] > 0


def test_model_config_reaches_the_transformer_configs():
    """config.ModelConfig (fp8, recipe, bf16 first/last, recompute) -> TransformerConfig fields."""
    from visurf_megatron.checkpoint.megatron_io import transformer_overrides
    from visurf_megatron.config import load_config

    cfg = load_config(None, ["model.fp8=hybrid", "model.fp8_recipe=tensorwise", "model.fp8_bf16_first_last_layers=2",
                             "model.recompute=full"])
    out = transformer_overrides(cfg.model)
    assert out["fp8"] == "hybrid" and out["fp8_recipe"] == "tensorwise"
    assert out["first_last_layers_bf16"] is True and out["num_layers_at_start_in_bf16"] == 2
    assert out["recompute_granularity"] == "full" and out["recompute_method"] == "uniform"
    assert transformer_overrides(load_config(None, []).model) == {}
    assert transformer_overrides(load_config(None, ["model.recompute=selective"]).model) == {"recompute_granularity": "selective"}
