"""Every example config loads and validates for the world size it targets; the paper's settings hold."""
import re
from pathlib import Path

import pytest

from visurf_megatron.config import load_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "examples" / "configs").rglob("*.yaml"))
# Configs without a "# target world size: N" comment.
WORLD_SIZES = {"tiny_visurf.yaml": 2}


def world_size(path: Path) -> int:
    match = re.search(r"^#\s*target world size:\s*(\d+)", path.read_text(), re.MULTILINE)
    if match:
        return int(match.group(1))
    assert path.name in WORLD_SIZES, f"{path.name}: add '# target world size: N' or a WORLD_SIZES entry"
    return WORLD_SIZES[path.name]


def test_configs_found():
    names = {p.name for p in CONFIGS}
    for size in ("3b", "7b", "32b", "72b"):
        assert f"qwen2_5_vl_{size}_visurf.yaml" in names
    for paradigm in ("sft", "rlvr", "sft_then_rlvr"):
        assert f"qwen2_5_vl_7b_{paradigm}.yaml" in names
    assert "qwen2_vl_7b_visurf.yaml" in names  # the paper's Table 3 on the other family


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_for_its_world_size(path):
    world = world_size(path)
    cfg = load_config(path, world_size=world)
    par = cfg.parallel
    assert par.tp * par.pp * par.dp == world
    if par.tp > 1 and path.name.startswith("qwen"):
        assert par.sequence_parallel


QWEN = [p for p in CONFIGS if p.name.startswith(("qwen2_5_vl_", "qwen2_vl_"))]


@pytest.mark.parametrize("path", QWEN, ids=lambda p: p.name)
def test_paper_hyper_parameters(path):
    cfg = load_config(path, world_size=world_size(path))
    paradigm = re.match(r"qwen2(?:_5)?_vl_\d+b_(.+)\.yaml", path.name).group(1)
    assert cfg.algorithm.paradigm == paradigm
    assert cfg.train.lr == 1e-6 and cfg.train.lr_warmup_steps == 0 and cfg.model.dtype == "bf16"
    assert cfg.data.image_size == 840
    assert cfg.data.prompts_per_step == (32 if paradigm == "sft" else 16)
    if paradigm != "sft":
        assert cfg.rollout.engine == "vllm" and cfg.rollout.n == 8 and cfg.rollout.temperature == 1.0
        assert cfg.rollout.max_new_tokens == 1024
        assert cfg.algorithm.kl_coef == 0.0 and cfg.algorithm.clip_low == cfg.algorithm.clip_high == 0.2
    if paradigm == "sft_then_rlvr":
        assert 0 < cfg.algorithm.sft_then_rlvr_switch_step < cfg.train.steps
    # The rollout TP group must fit on one node and split the world.
    assert cfg.rollout.tp <= 8 and world_size(path) % cfg.rollout.tp == 0


def test_72b_uses_fp8_with_bf16_edges():
    cfg = load_config(ROOT / "examples/configs/qwen2_5_vl_72b_visurf.yaml", world_size=64)
    assert cfg.model.fp8 == "hybrid" and cfg.model.fp8_bf16_first_last_layers >= 1
    assert cfg.model.fp8_recipe != "delayed" and cfg.model.recompute == "full"
    assert (cfg.parallel.tp, cfg.rollout.tp) == (8, 8) and cfg.parallel.pp >= 4
