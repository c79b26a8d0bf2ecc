#!/usr/bin/env python
"""Per-GPU memory estimate (GiB) for ViSurf training of Qwen2.5-VL on megatron-core, vLLM colocated.

    python tools/estimate_memory.py --model 7b --gpus 32 --tp 2 --recompute selective --rollout-tp 2
    python tools/estimate_memory.py --hf-config /models/Qwen2.5-VL-7B-Instruct/config.json --gpus 8 --tp 2
    python tools/estimate_memory.py --suggest --nodes 4

Components (per GPU, worst pipeline stage):
* weights: bf16, 2 bytes/param of the stage's shard (params / tp; embeddings + vision on stage 0,
  output layer on the last stage; vocab padded to a multiple of 128*tp as megatron does);
* grads: megatron DDP main grads in fp32 (4 bytes/trainable param, not sharded over DP);
* optimizer: fp32 master copy + Adam m, v = 12 bytes/trainable param, / DP with the distributed
  optimizer (megatron's "6 + 12/d" bytes per parameter with the grads above);
* fp8_weight_cache: with FP8, TE keeps an FP8 copy and its transpose of every FP8 GEMM weight (2 B);
* activations: per layer, Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
  Transformer Models"), bytes: s*b*h*(34 + 5*a*s/h) with TP+SP divided by t (without SP:
  s*b*h*(10 + 24/t + 5*a*s/(h*t))); selective recompute drops the 5as/h term, full recompute keeps
  only the layer input 2*s*b*h (/t with SP) plus one layer being recomputed. Stage 0 of a 1F1B
  pipeline holds pp micro-batches in flight, i.e. all L layers' worth (interleaved: times
  1 + (pp-1)/(pp*vpp)). The vision tower (windowed attention, 4 full-attention blocks) uses the same
  formula on stage 0, never with sequence parallelism (the model runs it without SP: its patch
  activations are whole on every TP rank) and with the same recompute setting (the vision tower
  recomputes its layers under ``recompute: full`` too); logits add 4*s*b*V/t bytes (fp32) on the
  last stage. ``swiglu_mlp`` replaces
  the paper's 4h-GeLU MLP term (19 sbh) by the SwiGLU one (2 + 6 f/h) sbh: the formula is for GPT.
  FP8 activation savings are not modelled (conservative);
* vLLM (colocated, sleep mode): it reserves gpu_memory_utilization x GPU memory (weights / rollout_tp
  + runtime + KV cache) while rolling out and frees it for training, so the peak is
  max(training phase, rollout phase); both phases hold weights + grads + optimizer;
* overhead: CUDA context, NCCL buffers, allocator fragmentation (default 3 GiB).

Reference point: the ViSurf paper trained the 7B with verl (FSDP + vLLM) on 8x H100 and reported
81.8 GB per GPU. For a comparable megatron layout (8 GPUs, TP=2 + SP, DP=4, distributed optimizer,
selective recompute, micro-batch 1, 2124 tokens, vLLM rollout TP=2 colocated at 0.45) this tool gives
74.8 GiB peak, the rollout phase: 37.7 GiB of training state (7.7 weights + 15.4 fp32 grads + 11.6
optimizer over DP=4 + 3 overhead) + 36 GiB vLLM + 1 GiB sync bucket; the training phase alone is
44.7 GiB. (`python tools/estimate_memory.py --model 7b --gpus 8 --tp 2`.) The paper's figure is of a
different stack (FSDP shards weights/grads/optimizer 8 ways; verl's vLLM share and what it reports
differ), so it is context, not a check.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, replace
from typing import Optional

GIB = 2 ** 30


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    tied: bool = False
    vision_depth: int = 32
    vision_hidden: int = 1280
    vision_heads: int = 16
    vision_ffn: int = 3420
    vision_full_attn_blocks: int = 4  # Qwen2.5-VL: blocks 7, 15, 23, 31; the rest use 112-px windows
    patch: int = 14
    merge: int = 2
    window_tokens: int = 64  # (112 / 14) ** 2 patches per attention window
    vision_gated_mlp: bool = True  # Qwen2.5-VL; Qwen2-VL: fc1 -> quick_gelu -> fc2 and LayerNorm (with bias)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def padded_vocab(self, tp: int = 1) -> int:
        mult = 128 * tp
        return int(math.ceil(self.vocab / mult) * mult)

    def lm_layer_params(self) -> int:
        h, d = self.hidden, self.head_dim
        q = h * self.heads * d + self.heads * d
        kv = 2 * (h * self.kv_heads * d + self.kv_heads * d)
        o = self.heads * d * h
        return q + kv + o + 3 * h * self.ffn + 2 * h

    def lm_linear_params_per_layer(self) -> int:
        return self.lm_layer_params() - 2 * self.hidden

    def vision_params(self) -> int:
        if self.vision_depth == 0:
            return 0
        hv, fv = self.vision_hidden, self.vision_ffn
        fc1s, norm = (2, hv) if self.vision_gated_mlp else (1, 2 * hv)  # RMSNorm: weight; LayerNorm: + bias
        block = (hv * 3 * hv + 3 * hv) + (hv * hv + hv) + fc1s * (hv * fv + fv) + (fv * hv + hv) + 2 * norm
        patch_embed = 3 * 2 * self.patch ** 2 * hv
        mh = hv * self.merge ** 2
        merger = norm + (mh * mh + mh) + (mh * self.hidden + self.hidden)
        return patch_embed + self.vision_depth * block + merger

    def lm_params(self, tp: int = 1) -> int:
        emb = self.padded_vocab(tp) * self.hidden
        return self.layers * self.lm_layer_params() + emb * (1 if self.tied else 2) + self.hidden

    def total_params(self, tp: int = 1) -> int:
        return self.lm_params(tp) + self.vision_params()


PRESETS = {
    "3b": ModelSpec("Qwen2.5-VL-3B", 2048, 36, 16, 2, 11008, 151936, tied=True),
    "7b": ModelSpec("Qwen2.5-VL-7B", 3584, 28, 28, 4, 18944, 152064),
    "32b": ModelSpec("Qwen2.5-VL-32B", 5120, 64, 40, 8, 27648, 152064),
    "72b": ModelSpec("Qwen2.5-VL-72B", 8192, 80, 64, 8, 29568, 152064),
}


def model_from_hf_config(path: str) -> ModelSpec:
    """ModelSpec from an HF Qwen2.5-VL or Qwen2-VL config.json (either key layout: flat or ``text_config``)."""
    with open(path) as fh:
        cfg = json.load(fh)
    text = {**cfg, **(cfg.get("text_config") or {})}
    vis = cfg.get("vision_config") or {}
    if cfg.get("model_type") == "qwen2_vl":
        # Qwen2-VL's vision tower in Qwen2.5-VL's terms: width embed_dim, plain MLP embed_dim * mlp_ratio,
        # full attention in every block.
        embed, depth = vis.get("embed_dim", 1280), vis.get("depth", 32)
        vis = {**vis, "hidden_size": embed, "intermediate_size": int(embed * vis.get("mlp_ratio", 4)),
               "fullatt_block_indexes": list(range(depth))}
    return ModelSpec(
        name=str(cfg.get("_name_or_path") or path), hidden=text["hidden_size"], layers=text["num_hidden_layers"],
        heads=text["num_attention_heads"], kv_heads=text.get("num_key_value_heads", text["num_attention_heads"]),
        ffn=text["intermediate_size"], vocab=text["vocab_size"],
        tied=bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
        vision_depth=vis.get("depth", 32), vision_hidden=vis.get("hidden_size", 1280),
        vision_heads=vis.get("num_heads", 16), vision_ffn=vis.get("intermediate_size", 3420),
        vision_full_attn_blocks=len(vis.get("fullatt_block_indexes", [7, 15, 23, 31])),
        patch=vis.get("patch_size", 14), merge=vis.get("spatial_merge_size", 2),
        window_tokens=(vis.get("window_size", 112) // vis.get("patch_size", 14)) ** 2,
        vision_gated_mlp=cfg.get("model_type") != "qwen2_vl",
    )


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    vpp: Optional[int] = None
    sequence_parallel: Optional[bool] = None  # None: on when tp > 1
    distributed_optimizer: bool = True
    recompute: str = "selective"  # none | selective | full
    micro_batch_size: int = 1
    num_microbatches: Optional[int] = None  # per step per DP rank; None: >= pp (pipeline full)
    seq_len: Optional[int] = None  # None: image tokens + prompt_text_tokens + max_new_tokens
    image_size: int = 840
    images_per_sample: int = 1
    prompt_text_tokens: int = 200
    max_new_tokens: int = 1024
    grad_fp32: bool = True
    fp8: bool = False
    fp8_bf16_first_last_layers: int = 1
    freeze_vision: bool = False
    swiglu_mlp: bool = False
    colocate_rollout: bool = True
    rollout_tp: Optional[int] = None  # None: = tp
    gpu_memory_utilization: Optional[float] = 0.45
    kv_cache_gib: Optional[float] = None  # instead of gpu_memory_utilization
    rollout_sleep: bool = True  # vLLM frees its memory during training (our engines do)
    vllm_runtime_gib: float = 1.5  # vLLM activations + CUDA graphs
    sync_bucket_mb: int = 512
    overhead_gib: float = 3.0
    gpu_gib: float = 80.0


def _vision_patches(model: ModelSpec, layout: Layout) -> int:
    return (layout.image_size // model.patch) ** 2 * layout.images_per_sample


def sequence_length(model: ModelSpec, layout: Layout) -> int:
    if layout.seq_len is not None:
        return layout.seq_len
    image_tokens = _vision_patches(model, layout) // model.merge ** 2
    return image_tokens + layout.prompt_text_tokens + layout.max_new_tokens


def layer_activation_bytes(s: int, b: int, h: int, a: int, t: int, sp: bool, recompute: str,
                           ffn: Optional[int] = None, attn_s: Optional[int] = None) -> float:
    """Korthikanti et al. per-layer activation bytes (``ffn`` given: SwiGLU MLP term instead of 4h GeLU)."""
    attn_s = s if attn_s is None else attn_s
    sbh = s * b * h
    if recompute == "full":
        return 2 * sbh / t if sp else 2 * sbh
    mlp_adjust = (2 + 6 * ffn / h) - 19 if ffn else 0.0
    scores = 5 * a * attn_s / h if recompute == "none" else 0.0
    if sp:
        return sbh * (34 + mlp_adjust + scores) / t
    return sbh * (10 + 24 / t + mlp_adjust / t + scores / t)


def _stage_layers(model: ModelSpec, pp: int) -> int:
    return math.ceil(model.layers / pp)


def estimate(model: ModelSpec, layout: Layout, stage: Optional[int] = None) -> dict:
    """Per-GPU memory of the worst pipeline stage (or of ``stage``): components in GiB plus a few counts."""
    if layout.recompute not in ("none", "selective", "full"):
        raise ValueError(f"recompute must be none|selective|full, got {layout.recompute!r}")
    t, pp, dp = layout.tp, layout.pp, layout.dp
    sp = layout.sequence_parallel if layout.sequence_parallel is not None else t > 1
    s, b = sequence_length(model, layout), layout.micro_batch_size
    vocab = model.padded_vocab(t)
    emb = vocab * model.hidden
    n_layers = _stage_layers(model, pp)
    in_flight = pp if layout.num_microbatches is None else min(pp, layout.num_microbatches)
    ffn = model.ffn if layout.swiglu_mlp else None
    per_layer = layer_activation_bytes(s, b, model.hidden, model.heads, t, sp, layout.recompute, ffn)
    work_layer = (layer_activation_bytes(s, b, model.hidden, model.heads, t, sp, "selective", ffn)
                  if layout.recompute == "full" else 0.0)
    # Vision tower (stage 0): s_v patches, windowed attention except a few full-attention blocks.
    s_v = _vision_patches(model, layout) * b
    vis_ffn = model.vision_ffn if layout.swiglu_mlp and model.vision_gated_mlp else None
    vis_act = vis_work = 0.0
    if model.vision_depth:
        full = min(model.vision_full_attn_blocks, model.vision_depth)
        for blocks, attn_s in ((full, s_v), (model.vision_depth - full, model.window_tokens)):
            vis_act += blocks * layer_activation_bytes(s_v, 1, model.vision_hidden, model.vision_heads, t, False,
                                                       layout.recompute, vis_ffn, attn_s)
        if layout.recompute == "full":  # the layer being recomputed (a full-attention one at worst)
            vis_work = layer_activation_bytes(s_v, 1, model.vision_hidden, model.vision_heads, t, False,
                                              "selective", vis_ffn, s_v)
    stages = []
    for i in range(pp):
        first, last = i == 0, i == pp - 1
        lo, hi = i * n_layers, min((i + 1) * n_layers, model.layers)
        lm = (hi - lo) * model.lm_layer_params()
        params = lm + (emb if first else 0) + ((model.hidden + (emb if not (model.tied and pp == 1) else 0))
                                               if last else 0)
        vision = model.vision_params() if first else 0
        params_gpu = (params + vision) / t
        trainable = (params + (0 if layout.freeze_vision else vision)) / t
        k = layout.fp8_bf16_first_last_layers
        stage_fp8 = max(0, min(hi, model.layers - k) - max(lo, k)) if layout.fp8 else 0
        flight = in_flight - i if layout.num_microbatches is None else max(1, in_flight - i)
        factor = (1 + (pp - 1) / (pp * layout.vpp)) if (layout.vpp and first) else 1.0
        acts = per_layer * (hi - lo) * flight * factor + (max(work_layer, vis_work) if first else work_layer)
        if first:
            acts += vis_act * flight * factor
        logits = 4 * s * b * vocab / t if last else 0.0
        comp = {
            "weights": 2 * params_gpu / GIB,
            "grads": (4 if layout.grad_fp32 else 2) * trainable / GIB,
            "optimizer": 12 * trainable / (dp if layout.distributed_optimizer else 1) / GIB,
            "fp8_weight_cache": 2 * stage_fp8 * model.lm_linear_params_per_layer() / t / GIB,
            "activations": acts / GIB,
            "logits": logits / GIB,
            "overhead": layout.overhead_gib,
        }
        comp["params_per_gpu"] = params_gpu
        stages.append(comp)

    # vLLM, colocated: same memory on every GPU (rollout DP replicas x rollout TP).
    rtp = layout.rollout_tp or t
    vllm_weights = 2 * model.total_params(rtp) / rtp / GIB
    if not layout.colocate_rollout:
        vllm_total = kv = 0.0
        vllm_weights = 0.0
    elif layout.kv_cache_gib is not None:
        kv = layout.kv_cache_gib
        vllm_total = vllm_weights + layout.vllm_runtime_gib + kv
    else:
        vllm_total = (layout.gpu_memory_utilization or 0.0) * layout.gpu_gib
        kv = vllm_total - vllm_weights - layout.vllm_runtime_gib
    kv_per_token = 2 * model.layers * max(1, model.kv_heads // rtp) * model.head_dim * 2
    bucket = 2 * layout.sync_bucket_mb / 1024 if layout.colocate_rollout else 0.0

    best = None
    if stage is not None and not 0 <= stage < pp:
        raise ValueError(f"stage {stage} outside 0..{pp - 1}")
    for i, comp in enumerate(stages):
        state = comp["weights"] + comp["grads"] + comp["optimizer"] + comp["fp8_weight_cache"] + comp["overhead"]
        train = state + comp["activations"] + comp["logits"] + (0.0 if layout.rollout_sleep else vllm_total)
        rollout = state + vllm_total + bucket if layout.colocate_rollout else 0.0
        result = dict(comp, vllm_weights=vllm_weights, vllm_kv_cache=kv, vllm_total=vllm_total, sync_bucket=bucket,
                      train_phase=train, rollout_phase=rollout, peak=max(train, rollout), stage=i,
                      seq_len=s, kv_cache_tokens=max(0.0, kv) * GIB / kv_per_token if layout.colocate_rollout else 0,
                      params_total=model.total_params(t))
        if stage == i:
            return result
        if best is None or result["peak"] > best["peak"]:
            best = result
    return best


def fits(result: dict, budget_gib: float) -> bool:
    kv_ok = result["vllm_kv_cache"] > 0 or result["vllm_total"] == 0
    return result["peak"] <= budget_gib and kv_ok


def suggest_layouts(model: ModelSpec, nodes: int, gpus_per_node: int = 8, budget_gib: float = 80,
                    base: Optional[Layout] = None) -> list[tuple[Layout, dict]]:
    """Layouts (TP within a node, PP dividing the layers, recompute) that fit, most DP / least recompute first."""
    base = base or Layout()
    world = nodes * gpus_per_node
    out = []
    for tp in (1, 2, 4, 8):
        if tp > gpus_per_node or model.heads % tp or model.kv_heads % tp:
            continue
        for pp in (1, 2, 4, 8, 16):
            if model.layers % pp or world % (tp * pp):
                continue
            for recompute in ("none", "selective", "full"):
                rtp = base.rollout_tp or max(tp, _min_rollout_tp(model, base))
                layout = replace(base, tp=tp, pp=pp, dp=world // (tp * pp), recompute=recompute,
                                 sequence_parallel=tp > 1, rollout_tp=rtp, gpu_gib=budget_gib)
                result = estimate(model, layout)
                if fits(result, budget_gib):
                    out.append((layout, result))
    order = {"none": 0, "selective": 1, "full": 2}
    out.sort(key=lambda lr: (-lr[0].dp, order[lr[0].recompute], lr[1]["peak"]))
    return out


def _min_rollout_tp(model: ModelSpec, base: Layout) -> int:
    """Smallest rollout TP whose vLLM weights take at most half of vLLM's budget."""
    budget = base.kv_cache_gib if base.kv_cache_gib is not None else (base.gpu_memory_utilization or 0) * base.gpu_gib
    for rtp in (1, 2, 4, 8):
        if model.heads % rtp == 0 and 2 * model.total_params(rtp) / rtp / GIB <= 0.5 * budget:
            return rtp
    return 8


ROWS = ["weights", "grads", "optimizer", "fp8_weight_cache", "activations", "logits", "overhead",
        "train_phase", "vllm_weights", "vllm_kv_cache", "vllm_total", "sync_bucket", "rollout_phase", "peak"]


def format_table(model: ModelSpec, layout: Layout, result: dict) -> str:
    lines = [f"{model.name}: {result['params_total'] / 1e9:.2f} B params, tp={layout.tp} pp={layout.pp} "
             f"dp={layout.dp} recompute={layout.recompute} mbs={layout.micro_batch_size} seq={result['seq_len']} "
             f"rollout_tp={layout.rollout_tp or layout.tp} (worst stage: {result['stage']})",
             f"{'component':<18}{'GiB':>9}"]
    lines += [f"{key:<18}{result[key]:>9.2f}" for key in ROWS]
    if result["vllm_total"]:
        lines.append(f"{'kv_cache_tokens':<18}{result['kv_cache_tokens']:>9.0f}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Exit status 1 when the layout does not fit the budget.")
    p.add_argument("--model", choices=sorted(PRESETS), default=None, help="built-in preset (default 7b)")
    p.add_argument("--hf-config", help="HF config.json of the model (instead of --model)")
    p.add_argument("--tp", type=int, default=1, help="training tensor parallel (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel (default 1)")
    p.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per rank")
    p.add_argument("--dp", type=int, default=None, help="data-parallel size (default: --gpus / (tp*pp), else 1)")
    p.add_argument("--gpus", type=int, default=None, help="world size, to derive --dp")
    p.add_argument("--no-sp", action="store_true", help="no sequence parallelism (default: on when tp > 1)")
    p.add_argument("--no-distributed-optimizer", action="store_true", help="optimizer states not sharded over DP")
    p.add_argument("--recompute", choices=["none", "selective", "full"], default="selective")
    p.add_argument("--mbs", type=int, default=1, help="micro-batch size")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: image + 200 + max new)")
    p.add_argument("--image-size", type=int, default=840)
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--fp8", action="store_true", help="FP8 GEMMs (first/last layer BF16)")
    p.add_argument("--freeze-vision", action="store_true", help="no grads/optimizer states for the vision tower")
    p.add_argument("--swiglu-mlp", action="store_true", help="SwiGLU MLP activation term instead of the paper's")
    p.add_argument("--no-colocate", action="store_true", help="no vLLM on the training GPUs")
    p.add_argument("--no-sleep", action="store_true", help="vLLM keeps its memory during training")
    p.add_argument("--rollout-tp", type=int, default=None, help="vLLM tensor parallel (default: --tp)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.45, help="vLLM share of GPU memory")
    p.add_argument("--kv-cache-gib", type=float, default=None, help="vLLM KV-cache budget instead of the share")
    p.add_argument("--overhead-gib", type=float, default=3.0, help="CUDA context, NCCL, fragmentation")
    p.add_argument("--budget-gib", type=float, default=80.0, help="GPU memory (H100-80GB: 80)")
    p.add_argument("--suggest", action="store_true", help="list layouts that fit --nodes x --gpus-per-node")
    p.add_argument("--nodes", type=int, default=1, help="nodes for --suggest (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node for --suggest (default 8)")
    args = p.parse_args(argv)

    models = ([model_from_hf_config(args.hf_config)] if args.hf_config else
              [PRESETS[args.model]] if args.model else
              [PRESETS[k] for k in ("7b", "32b", "72b")] if args.suggest else [PRESETS["7b"]])
    base = Layout(tp=args.tp, pp=args.pp, vpp=args.vpp, sequence_parallel=False if args.no_sp else None,
                  distributed_optimizer=not args.no_distributed_optimizer, recompute=args.recompute,
                  micro_batch_size=args.mbs, seq_len=args.seq_len, image_size=args.image_size,
                  max_new_tokens=args.max_new_tokens, fp8=args.fp8, freeze_vision=args.freeze_vision,
                  swiglu_mlp=args.swiglu_mlp, colocate_rollout=not args.no_colocate, rollout_sleep=not args.no_sleep,
                  rollout_tp=args.rollout_tp, gpu_memory_utilization=args.gpu_memory_utilization,
                  kv_cache_gib=args.kv_cache_gib, overhead_gib=args.overhead_gib, gpu_gib=args.budget_gib)
    if args.suggest:
        for model in models:
            found = suggest_layouts(model, args.nodes, args.gpus_per_node, args.budget_gib, base)
            print(f"{model.name} on {args.nodes} x {args.gpus_per_node} GPUs ({args.budget_gib:g} GiB): "
                  f"{len(found)} layout(s) fit")
            for layout, res in found:
                print(f"  tp={layout.tp} pp={layout.pp} dp={layout.dp} recompute={layout.recompute:<9} "
                      f"rollout_tp={layout.rollout_tp}  peak {res['peak']:6.1f} GiB  (train {res['train_phase']:.1f}, "
                      f"rollout {res['rollout_phase']:.1f}, kv {res['vllm_kv_cache']:.1f})")
        return 0
    model = models[0]
    dp = args.dp or (args.gpus // (args.tp * args.pp) if args.gpus else 1)
    if args.gpus and args.gpus % (args.tp * args.pp):
        p.error(f"tp*pp={args.tp * args.pp} does not divide --gpus {args.gpus}")
    layout = replace(base, dp=dp)
    result = estimate(model, layout)
    print(format_table(model, layout, result))
    if not fits(result, args.budget_gib):
        why = (f"peak {result['peak']:.1f} GiB > budget {args.budget_gib:g} GiB" if result["peak"] > args.budget_gib
               else f"vLLM weights ({result['vllm_weights']:.1f} GiB) leave no KV cache")
        print(f"DOES NOT FIT: {why}", file=sys.stderr)
        return 1
    print(f"fits: peak {result['peak']:.1f} GiB <= {args.budget_gib:g} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
