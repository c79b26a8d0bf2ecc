"""What the GPU path needs and a CPU run cannot see (issue 17), checked on CPU.

On CPU every tensor already lives on the only device and gloo takes CPU tensors, so these tests
make the difference visible: the "meta" device stands in for the GPU (a micro-batch that is not
moved stays on the CPU and fails there), and where a test must pretend CUDA exists it replaces
``torch.cuda`` answers only, named ``fake_cuda_*``. Which defect of the issue each test guards is
in its name's comment.
"""
import dataclasses

import pytest
import torch
import torch.distributed as dist

from tests.qwen_fixtures import build_checkpoint
from visurf_megatron.algorithm.paradigms import RowBatch, paradigm_from_config
from visurf_megatron.config import AlgorithmConfig, ConfigError, load_config
from visurf_megatron.models.qwen2_5_vl.config import LayoutError, ParallelLayout, configs_from_hf
from visurf_megatron.models.qwen2_5_vl.specs import check_fp8_recipe_supported, fp8_gemm_shape_ok, fp8_overrides
from visurf_megatron.runtime.distributed import process_group_backend
from visurf_megatron.runtime.spawn import run_world
from visurf_megatron.training.batching import (
    MicroBatch, PreparedPrompt, Row, collate, padded_length, sequence_multiple,
)
from visurf_megatron.training.update_loss import attach_rows, update_loss_fn

IMAGE = 9  # image placeholder id of the hand-made prompts below


def _prompts():
    # One image of 2x2 patches (one merged token) per prompt; pixels as the processor lays them out.
    def prompt(ids):
        return PreparedPrompt(sample_id="s", text="", images=[], input_ids=torch.tensor(ids),
                              pixel_values=torch.randn(4, 3 * 2 * 14 * 14), image_grid_thw=torch.tensor([[1, 2, 2]]))
    return [prompt([1, 2, IMAGE, 3]), prompt([4, IMAGE, 5])]


def _rows():
    return [Row(prompt=0, response_ids=[6, 7, 8], is_gt=False), Row(prompt=0, response_ids=[6, 7], is_gt=True),
            Row(prompt=1, response_ids=[8], is_gt=False), Row(prompt=1, response_ids=[7, 7, 6, 6], is_gt=True)]


def _row_info(rows):
    paradigm = paradigm_from_config(AlgorithmConfig(paradigm="visurf"))
    batch = RowBatch(torch.tensor([1.0, 3.0, 0.0, 3.0], dtype=torch.float64), torch.tensor([r.prompt for r in rows]),
                     torch.tensor([r.is_gt for r in rows]), torch.tensor([False, True, False, True]), None)
    return paradigm, paradigm.compute_row_info(batch, 0)


def _update_micro_batch(with_old=True):
    rows, prompts = _rows(), _prompts()
    mb = collate(rows, [1, 2], prompts, image_token_id=IMAGE, pad_id=0, seq_length=padded_length(rows, prompts, 4),
                 micro_batch_size=3)
    paradigm, info = _row_info(rows)
    old = {r: torch.randn(mb.input_ids.shape[1]) for r in range(len(rows))} if with_old else None
    attach_rows([mb], info, old)
    return paradigm, mb


def _tensors(obj, prefix=""):
    """Every tensor reachable from a dataclass's fields (dataclasses and dicts recursively)."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, torch.Tensor):
            out[prefix + f.name] = value
        elif dataclasses.is_dataclass(value):
            out.update(_tensors(value, f"{prefix}{f.name}."))
        elif isinstance(value, dict):
            out.update({f"{prefix}{f.name}.{k}": v for k, v in value.items() if isinstance(v, torch.Tensor)})
    return out


# --------------------------------------------------------------------------------------------
# Defect 1: micro-batches (and the row info the loss reads) reach the model's device.


def test_micro_batch_moves_every_field_and_its_row_info():  # defect 1
    _, mb = _update_micro_batch()
    before = _tensors(mb)
    assert {"input_ids", "labels", "loss_mask", "position_ids", "pixel_values", "image_grid_thw", "row_index",
            "old_logp", "rows.advantages", "rows.pg_rows", "rows.sft_rows", "rows.shaped_rows"} <= set(before)
    moved = mb.to("meta")
    after = _tensors(moved)
    assert set(after) == set(before)
    assert [name for name, t in after.items() if t.device.type != "meta"] == []
    assert all(t.device.type == "cpu" for t in _tensors(mb).values())  # the CPU original is left alone
    # Every dataclass field holding a tensor is visited: a field added to MicroBatch later moves too.
    tensor_fields = {f.name for f in dataclasses.fields(MicroBatch) if isinstance(getattr(mb, f.name), torch.Tensor)}
    assert tensor_fields <= {name.split(".")[0] for name in after}


def test_update_loss_runs_on_the_model_device():  # defect 1
    paradigm, mb = _update_micro_batch()
    loss_fn = update_loss_fn(paradigm, {"loss": torch.tensor(5.0, dtype=torch.float64)}, step=0, scale=2.0,
                             entropy_coef=0.0)
    device_mb = mb.to("meta")
    logp = torch.randn(mb.input_ids.shape, device="meta", requires_grad=True)
    loss, out = loss_fn(device_mb, logp, torch.randn(mb.input_ids.shape, device="meta"))
    assert loss.device.type == "meta" and loss.requires_grad
    assert out["logp"].device.type == out["entropy"].device.type == "meta"
    assert all(v.device.type == "meta" for v in out["metrics"].values() if isinstance(v, torch.Tensor))
    # What the old trainer did: the micro-batch on the device, the row info left on the CPU.
    stale = dataclasses.replace(device_mb, rows=mb.rows)
    with pytest.raises((RuntimeError, NotImplementedError)):
        loss_fn(stale, logp, None)


def test_update_loss_without_old_logprobs_uses_ratio_one():  # defect 1 (the single-update path)
    paradigm, mb = _update_micro_batch(with_old=False)
    assert mb.old_logp is None
    loss_fn = update_loss_fn(paradigm, {"loss": torch.tensor(4.0, dtype=torch.float64)}, step=0, scale=1.0,
                             entropy_coef=0.0)
    logp = torch.randn(mb.input_ids.shape, requires_grad=True)
    _, out = loss_fn(mb, logp, None)
    assert float(out["metrics"]["ratio_mean"]) == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------
# Defect 2: CPU tensors handed to collectives have a backend on a GPU run.


def test_default_group_backend_maps_cpu_to_gloo_and_cuda_to_nccl():  # defect 2
    config = dist.distributed_c10d.BackendConfig(dist.Backend(process_group_backend(cuda=True)))
    assert config.get_device_backend_map() == {"cpu": "gloo", "cuda": "nccl"}
    config = dist.distributed_c10d.BackendConfig(dist.Backend(process_group_backend(cuda=False)))
    assert config.get_device_backend_map()["cpu"] == "gloo"


# --------------------------------------------------------------------------------------------
# Defect 3: FP8 + sequence parallel: Transformer Engine's shape rule.


def test_fp8_gemm_shape_rule_is_transformer_engines():  # defect 3
    # TE 2.11 assert_dim_for_fp8_exec: prod(dims[:-1]) % 8 == 0 and dims[-1] % 16 == 0.
    assert fp8_gemm_shape_ok((8, 16)) and fp8_gemm_shape_ok((2, 4, 32)) and fp8_gemm_shape_ok((24, 3584))
    assert not fp8_gemm_shape_ok((4, 16)) and not fp8_gemm_shape_ok((8, 12)) and not fp8_gemm_shape_ok((3, 3, 16))


@pytest.mark.parametrize("tp", range(1, 9))
def test_padded_length_satisfies_fp8_rule_for_tp_1_to_8(tp):  # defect 3
    hidden = 8192  # 72B
    for sp in ([False, True] if tp > 1 else [False]):
        for fp8 in (False, True):
            multiple = sequence_multiple(tp, sp, fp8)
            for raw in range(1, 300):
                s = -(-raw // multiple) * multiple
                assert s - raw < multiple
                if sp:
                    assert s % tp == 0
                if fp8:
                    for b in range(1, 5):
                        local_rows = s // tp * b if sp else s * b  # TE checks before the SP all-gather
                        assert fp8_gemm_shape_ok((local_rows, hidden)), (tp, sp, raw, b)
    # The 72B layout of the issue: tp 8, SP, mbs 1, FP8. Padding to tp alone (the old rule) fails.
    assert sequence_multiple(8, True, True) == 64
    assert not fp8_gemm_shape_ok((8 * 5 // 8, hidden))


def test_padded_length_uses_the_multiple():  # defect 3
    rows, prompts = _rows(), _prompts()
    assert max(len(prompts[r.prompt].input_ids) + len(r.response_ids) for r in rows) == 7
    assert padded_length(rows, prompts, sequence_multiple(1, False, False)) == 7
    assert padded_length(rows, prompts, sequence_multiple(2, True, False)) == 8
    assert padded_length(rows, prompts, sequence_multiple(1, False, True)) == 8
    assert padded_length(rows, prompts, sequence_multiple(2, True, True)) == 16


# --------------------------------------------------------------------------------------------
# Defect 6: the vision tower under FP8 (geometry refused when TE cannot run it).


def test_fp8_vision_refused_for_qwen_vision_geometry(tmp_path):  # defect 6
    from tests.unit.test_qwen_config import HUB

    for tp in (1, 2, 4, 8):
        with pytest.raises(LayoutError, match=r"linear_fc2 \[1280, \d+\].*model.fp8_vision=false"):
            configs_from_hf(HUB["72B"], ParallelLayout(tp=tp), params_dtype=torch.bfloat16, fp8_vision=True,
                            **fp8_overrides("hybrid", "tensorwise", 1))
    # BF16 vision with FP8 language is unaffected.
    configs_from_hf(HUB["72B"], ParallelLayout(tp=8), params_dtype=torch.bfloat16, **fp8_overrides("hybrid"))
    # A geometry TE can run (the tiny checkpoint's) is accepted.
    _, vis, _ = configs_from_hf(build_checkpoint(tmp_path, "untied"), params_dtype=torch.bfloat16, fp8_vision=True,
                                **fp8_overrides("hybrid", "tensorwise", 1))
    assert vis.fp8 == "hybrid"


# --------------------------------------------------------------------------------------------
# Defect 8: construction at scale.


def test_megatron_builds_on_the_gpu_when_there_is_one(tmp_path, monkeypatch):  # defect 8
    hf = build_checkpoint(tmp_path, "untied")
    lang, vis, _ = configs_from_hf(hf)
    cuda = torch.cuda.is_available()
    assert lang.use_cpu_initialization == vis.use_cpu_initialization == (not cuda)  # no GPU: build on the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # fake_cuda_available
    lang, vis, _ = configs_from_hf(hf)
    assert not lang.use_cpu_initialization and not vis.use_cpu_initialization
    # A caller that writes files only (Megatron -> HF) keeps the model on the CPU on purpose.
    lang, vis, _ = configs_from_hf(hf, use_cpu_initialization=True)
    assert lang.use_cpu_initialization and vis.use_cpu_initialization


# --------------------------------------------------------------------------------------------
# Defect 9: knobs that cannot work are refused, naming the setting.


def test_mxfp8_refused_below_compute_capability_10(monkeypatch):  # defect 9
    with pytest.raises(ValueError, match=r"fp8_recipe=mxfp8 needs GPU compute capability >= 10.0, this GPU has 9.0"):
        check_fp8_recipe_supported("mxfp8", (9, 0))
    check_fp8_recipe_supported("mxfp8", (10, 0))
    check_fp8_recipe_supported("tensorwise", (9, 0))
    check_fp8_recipe_supported("blockwise", (9, 0))
    with pytest.raises(ValueError, match="blockwise needs GPU compute capability >= 9.0, this GPU has 8.9"):
        check_fp8_recipe_supported("blockwise", (8, 9))
    # On a Hopper GPU the model's FP8 fields are refused before any weight is built.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # fake_cuda_available
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))  # fake_cuda_hopper
    with pytest.raises(ValueError, match="mxfp8"):
        fp8_overrides("hybrid", "mxfp8", 0)
    assert fp8_overrides("hybrid", "tensorwise", 1)["fp8_recipe"] == "tensorwise"


def test_virtual_pipeline_refused():  # defect 9
    with pytest.raises(ConfigError, match=r"parallel.vpp=2 is not supported.*one model chunk per pipeline rank"):
        load_config(None, ["parallel.pp=2", "parallel.vpp=2"])
    assert load_config(None, ["parallel.pp=2"]).parallel.vpp is None


# --------------------------------------------------------------------------------------------
# Real megatron in a 1-rank gloo world: the schedule moves micro-batches (defect 1), the default
# group and megatron's groups carry gloo for CPU tensors (defect 2), entropy autograd (defect 8),
# the vision tower's FP8 context, padding and full recompute (defect 6).


class MetaModelChunk(torch.nn.Module):
    """fake_cuda_model: a model chunk whose parameters live on "meta", standing in for one on the GPU.
    It records where its inputs are and returns logits there."""

    def __init__(self, config, vocab):
        from megatron.core.transformer.enums import ModelType

        super().__init__()
        self.config = config
        self.model_type = ModelType.encoder_or_decoder
        self.weight = torch.nn.Parameter(torch.zeros(vocab, device="meta"))
        self.seen = []

    def set_input_tensor(self, tensor):  # read by megatron's schedule; one stage, nothing arrives
        pass

    def forward(self, input_ids, position_ids, pixel_values, image_grid_thw, temperature=1.0):
        self.seen.append({"input_ids": input_ids.device.type, "position_ids": position_ids.device.type,
                          "pixel_values": pixel_values.device.type, "image_grid_thw": image_grid_thw.device.type})
        return torch.zeros(*input_ids.shape, self.weight.shape[0], device=self.weight.device) + self.weight


def one_rank_world(hf_dir):
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_config import TransformerConfig

    from visurf_megatron.runtime.distributed import setup_model_parallel
    from visurf_megatron.training.forward import run_micro_batches, vocab_parallel_logprobs

    setup_model_parallel()
    default = dist.get_backend_config()
    out = {"backend": dist.distributed_c10d.BackendConfig(dist.Backend(str(default))).get_device_backend_map(),
           "expected_backend": process_group_backend(torch.cuda.is_available()),
           "groups": {name: str(dist.get_backend_config(getattr(parallel_state, f"get_{name}_group")())) == str(default)
                      for name in ("data_parallel", "tensor_model_parallel", "pipeline_model_parallel", "model_parallel")}}
    # A CPU float64 total over the DP group and a MIN flag over the world, as the trainer does.
    total = torch.tensor([2.5], dtype=torch.float64)
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    out["reduced"] = float(total)

    # defect 1: the schedule moves the micro-batch to the chunk's device before the model and the loss see it.
    paradigm, mb = _update_micro_batch()
    config = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=1, use_cpu_initialization=True)
    chunk = MetaModelChunk(config, vocab=11)
    seen_by_loss = []

    def loss_fn(batch, logp, entropy):
        seen_by_loss.append({k: v.device.type for k, v in _tensors(batch).items()})
        return logp.sum() * 0, {"logp": logp.detach()}

    run_micro_batches([chunk], [mb, mb], loss_fn, forward_only=True)
    out["model_saw"], out["loss_saw"] = chunk.seen, seen_by_loss

    # defect 8: entropy as a metric keeps no autograd graph (and no [B, S, V] softmax for backward).
    logits = torch.randn(2, 5, 64, requires_grad=True)
    labels = torch.randint(0, 64, (2, 5))
    saved = {}
    for grad in (True, False):
        count = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: count.append(t.numel()) or t, lambda t: t):
            logp, entropy = vocab_parallel_logprobs(logits, labels, with_entropy=True, entropy_grad=grad)
        saved[grad] = sum(count)
        out[f"entropy_requires_grad_{grad}"] = entropy.requires_grad
        out[f"logp_requires_grad_{grad}"] = logp.requires_grad
        out[f"entropy_{grad}"] = entropy.detach()
    out["saved"] = saved
    out["vision"] = _vision_checks(hf_dir)
    return out


def _vision_checks(hf_dir):
    """Defect 6: FP8 context per layer (Transformer Engine's context faked: TE cannot run on CPU),
    the patch sequence padded to TE's multiple, and full recompute (CUDA RNG state faked)."""
    import megatron.core.tensor_parallel.random as mrandom

    from visurf_megatron.models.qwen2_5_vl import vision as vision_module
    from visurf_megatron.models.qwen2_5_vl.specs import vision_layer_spec
    from visurf_megatron.models.qwen2_5_vl.vision import Qwen25VisionModel

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")

    def build(**overrides):
        _, vis, extras = configs_from_hf(hf_dir, **overrides)
        torch.manual_seed(0)
        model = Qwen25VisionModel(vis, vision_layer_spec("local"), extras).to(device)
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.05)
        return model

    grid = torch.tensor([[1, 2, 6]])  # 12 patches: not a multiple of 8
    pixels = torch.randn(12, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(1)).to(device)
    reference = build()
    ref_out = reference(pixels, grid)

    entered, rows = [], []

    class FakeFp8Context:  # fake_te_fp8_context: records which layer entered it
        def __init__(self, layer_no):
            self.layer_no = layer_no

        def __enter__(self):
            entered.append(self.layer_no)

        def __exit__(self, *exc):
            return False

    original = vision_module.get_fp8_context
    vision_module.get_fp8_context = lambda config, layer_no=-1, is_init=False: FakeFp8Context(layer_no)
    try:
        fp8_model = build(fp8_vision=True, **fp8_overrides("hybrid", "tensorwise", 0))
        fp8_model.load_state_dict(reference.state_dict())
        hooks = [layer.register_forward_pre_hook(lambda m, a, k: rows.append(k["hidden_states"].shape[0]), with_kwargs=True)
                 for layer in fp8_model.decoder.layers]
        fp8_out = fp8_model(pixels, grid)
        for h in hooks:
            h.remove()
    finally:
        vision_module.get_fp8_context = original
    result = {"fp8_layers_entered": entered, "fp8_rows": rows, "layers": len(reference.decoder.layers),
              "fp8_max_diff": float((fp8_out - ref_out).abs().max().cpu())}

    # Full recompute: the same gradients, far fewer saved activations.
    cuda_get, cuda_set = mrandom._get_cuda_rng_state, mrandom._set_cuda_rng_state
    if not cuda:  # megatron's checkpoint saves the CUDA RNG state; there is none on a CPU machine
        mrandom._get_cuda_rng_state = lambda *a, **k: torch.zeros(1, dtype=torch.uint8)  # fake_cuda_rng_state
        mrandom._set_cuda_rng_state = lambda *a, **k: None  # fake_cuda_rng_state
    try:
        stats = {}
        for name, model in (("plain", reference),
                            ("recompute", build(recompute_granularity="full", recompute_method="uniform",
                                                recompute_num_layers=1))):
            model.load_state_dict(reference.state_dict())
            model.train()
            model.zero_grad(set_to_none=True)
            saved = []
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                          lambda t: t):
                y = model(pixels, grid)
            (y.float() ** 2).sum().backward()
            stats[name] = {"saved_bytes": sum(saved),
                           "grads": {n: p.grad.cpu() for n, p in model.named_parameters()}}
    finally:
        mrandom._get_cuda_rng_state, mrandom._set_cuda_rng_state = cuda_get, cuda_set
    result["saved_plain"] = stats["plain"]["saved_bytes"]
    result["saved_recompute"] = stats["recompute"]["saved_bytes"]
    result["grad_max_diff"] = max(float((stats["plain"]["grads"][n] - g).abs().max())
                                  for n, g in stats["recompute"]["grads"].items())
    return result


def test_one_rank_world_contracts(tmp_path):  # defects 1, 2, 6, 8
    hf_dir = build_checkpoint(tmp_path, "untied")
    (out,) = run_world(one_rank_world, 1, hf_dir, timeout_s=300)
    # defect 2: the default group is a device map (CPU tensors: gloo), and megatron's groups inherit it.
    cuda = torch.cuda.is_available()
    assert out["expected_backend"] == ("cpu:gloo,cuda:nccl" if cuda else "gloo")
    assert out["backend"]["cpu"] == "gloo"
    if cuda:
        assert out["backend"] == {"cpu": "gloo", "cuda": "nccl"}
    assert all(out["groups"].values()), out["groups"]
    assert out["reduced"] == 2.5
    # defect 1
    assert out["model_saw"] == [{"input_ids": "meta", "position_ids": "meta", "pixel_values": "meta",
                                 "image_grid_thw": "meta"}] * 2
    assert len(out["loss_saw"]) == 2
    for seen in out["loss_saw"]:
        assert seen and set(seen.values()) == {"meta"}, seen
        assert "rows.advantages" in seen and "old_logp" in seen
    # defect 8: the metric has no graph and the forward keeps less for backward; the values agree.
    assert out["logp_requires_grad_True"] and out["logp_requires_grad_False"]
    assert out["entropy_requires_grad_True"] and not out["entropy_requires_grad_False"]
    assert out["saved"][False] < out["saved"][True]
    assert torch.equal(out["entropy_True"], out["entropy_False"])
    # defect 6: every vision layer entered the (fake) FP8 context, on a padded patch sequence, and
    # the padding changed nothing; full recompute gives the same gradients and saves far less.
    v = out["vision"]
    assert v["fp8_layers_entered"] == list(range(v["layers"]))
    assert v["fp8_rows"] == [16] * v["layers"]
    assert v["fp8_max_diff"] <= 1e-5
    assert v["grad_max_diff"] <= 1e-5
    # (without recompute in the vision tower both are equal; the rest is the patch embedding and merger)
    assert v["saved_recompute"] < 0.6 * v["saved_plain"], (v["saved_recompute"], v["saved_plain"])


def test_memory_estimate_runs_the_vision_tower_without_sequence_parallel():  # defect 6
    from dataclasses import replace

    from tools.estimate_memory import PRESETS, Layout, estimate

    model = PRESETS["7b"]
    no_vision = replace(model, vision_depth=0)
    base = Layout(tp=2, dp=4, colocate_rollout=False, overhead_gib=0.0)

    def vision_activations(**kw):
        layout = replace(base, **kw)
        return estimate(model, layout, stage=0)["activations"] - estimate(no_vision, layout, stage=0)["activations"]

    for recompute in ("none", "selective", "full"):
        # The model never runs the vision tower sequence-parallel: the LM's SP setting changes nothing there.
        assert vision_activations(recompute=recompute, sequence_parallel=True) == pytest.approx(
            vision_activations(recompute=recompute, sequence_parallel=False))
    # Full recompute keeps each vision layer's whole input [s_v, 1, h_v] (bf16, not split over TP); the
    # one layer being recomputed at a time is the LM's here (larger than a vision layer).
    s_v = (840 // 14) ** 2
    kept = 32 * 2 * s_v * model.vision_hidden / 2**30
    assert vision_activations(recompute="full") == pytest.approx(kept)
    assert kept < vision_activations(recompute="selective")


# --------------------------------------------------------------------------------------------
# The first GPU minutes: the smoke script and the wheels it installs.


def test_gpu_smoke_script_lists_its_checks_and_passes_shellcheck():
    import shutil
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    script = root / "tools" / "gpu_smoke.sh"
    out = subprocess.run([str(script), "--dry-run"], capture_output=True, text=True, timeout=60, check=True).stdout
    checks = [line.split()[0] for line in out.splitlines()[1:]]
    assert checks == ["setup", "contracts", "parity", "te_fp8", "packing", "convert", "train", "train_te", "train_pack",
                      "vllm", "export"]
    only = subprocess.run([str(script), "--dry-run", "--only", "convert,train"], capture_output=True, text=True,
                          timeout=60, check=True).stdout
    assert [line.split()[0] for line in only.splitlines()[1:]] == ["convert", "train"]
    bad = subprocess.run([str(script), "--only", "bogus"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown check: bogus" in bad.stderr
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed")
    lint = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True, timeout=60)
    assert lint.returncode == 0, lint.stdout


def test_make_gpu_wheels_downloads_python_312_manylinux_megatron_core():
    import re
    import shutil
    import subprocess
    from pathlib import Path

    if shutil.which("make") is None:
        pytest.skip("make not installed")
    root = Path(__file__).resolve().parents[2]
    plan = subprocess.run(["make", "-n", "gpu-wheels"], cwd=root, capture_output=True, text=True, timeout=60,
                          check=True).stdout.replace("\\\n", " ")  # one line per command
    pin = re.search(r"megatron-core==[0-9.]+", (root / "setup.py").read_text()).group(0)
    download = next(line for line in plan.splitlines() if "pip download" in line)
    for part in ("--python-version 3.12", "--implementation cp", "--only-binary=:all:", "--no-deps",
                 "--platform manylinux_2_28_x86_64", "--platform manylinux2014_x86_64", "-d .whl", pin):
        assert part in download, part
    assert subprocess.run(["git", "check-ignore", "-q", ".whl/x.whl"], cwd=root).returncode == 0  # never committed
