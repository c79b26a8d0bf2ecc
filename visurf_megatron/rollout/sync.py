"""Megatron TP/PP shards -> full HF-named tensors, streamed in size-bounded buckets (rollout weight sync).

``export_hf_weights(model_chunks)`` yields ``(hub_name, tensor)`` for every tensor of an HF checkpoint of
the model (Hub naming; the tied ``lm_head`` is never yielded), bit-identical to what
``checkpoint.mapping.gather_hf_state_dict`` (and so the converter) produces. It is a collective: every
rank of the model-parallel group (TP x PP) must iterate it to the end, in lockstep; every rank yields
every tensor. Data-parallel replicas run their own copies independently.

How a bucket moves (the plan is built once per model and cached, see ``get_plan``):

1. The owning pipeline stage stages the TP shards of the bucket's sharded parameters in one buffer and
   runs **one** ``all_gather_into_tensor`` over its TP group (replicated parameters need none). The
   send / receive buffers live in one workspace reused by every bucket of an export.
2. Each parameter's full HF tensors come from the mapping table's ``to_hf`` transform (QKV grouped
   re-layout, gate/up split, vocabulary-padding trim).
3. With PP > 1 they are copied into one flat bucket buffer and that is **one** ``broadcast`` from the
   owner stage over the PP group (a bucket of a single tensor is broadcast as it is); the other stages
   receive into a buffer of the planned size. Every rank then yields views of it.

Memory: beyond the model, a rank holds one bucket (its flat buffer, or with PP = 1 its HF tensors),
plus, on the owner while it fills the bucket, the workspace (the gathered shards of at most one
bucket) and one parameter's transform temporaries. A bucket holds at most ``bucket_bytes``, or one
tensor when a single tensor is larger. Yielded tensors never alias the workspace and are never reused
for a later bucket (a consumer that keeps them keeps that memory); on its own stage a replicated
parameter (norms, biases) may be yielded as a detached view of the model's own tensor: consumers copy
(vLLM's ``load_weights`` and the transformers engine do), anything kept must be cloned.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch

from ..checkpoint.mapping import resolve_params, unwrap
from ..checkpoint.transforms import MappingContext, Replicated

DEFAULT_BUCKET_BYTES = 512 << 20


@dataclass(frozen=True)
class ParamPlan:
    """One exported megatron parameter: where its shard lives and which HF tensors it becomes."""

    index: int  # position among the owner rank's exported parameters
    megatron_name: str  # global name (for error messages)
    shard_shape: tuple[int, ...]
    gathered: bool  # TP shards are all-gathered (False: replicated, or tp == 1)
    hf: tuple[tuple[str, tuple[int, ...]], ...]  # (hub name, full shape), in transform order

    @property
    def shard_numel(self) -> int:
        return math.prod(self.shard_shape)

    @property
    def hf_numel(self) -> int:
        return sum(math.prod(shape) for _, shape in self.hf)


@dataclass(frozen=True)
class Bucket:
    stage: int  # pipeline stage that owns (gathers and broadcasts) it
    dtype: str
    params: tuple[ParamPlan, ...]
    tp_size: int

    @property
    def hf_numel(self) -> int:
        return sum(p.hf_numel for p in self.params)

    @property
    def gather_numel(self) -> int:
        """Elements of this rank's all-gather send buffer (sharded parameters only)."""
        return sum(p.shard_numel for p in self.params if p.gathered)

    @property
    def nbytes(self) -> int:
        """Largest buffer the bucket materialises: the gathered shards or the flat HF tensors."""
        itemsize = _itemsize(self.dtype)
        gathered = sum(p.shard_numel * (self.tp_size if p.gathered else 1) for p in self.params)
        return max(gathered, self.hf_numel) * itemsize


@dataclass(frozen=True)
class TransferPlan:
    """Every bucket of every pipeline stage, in transfer order (identical on all ranks of a PP group)."""

    buckets: tuple[Bucket, ...]
    tp_size: int
    pp_size: int
    stage: int
    bucket_bytes: int

    def hf_entries(self) -> list[tuple[str, tuple[int, ...], str]]:
        """(hub name, shape, dtype) of every yielded tensor, in stream order."""
        return [(name, shape, b.dtype) for b in self.buckets for p in b.params for name, shape in p.hf]

    @property
    def largest_tensor_bytes(self) -> int:
        sizes = [math.prod(shape) * _itemsize(d) for _, shape, d in self.hf_entries()]
        return max(sizes, default=0)


@dataclass
class ExportStats:
    """What one export did (filled while iterating; useful for tests and benchmarks)."""

    buckets: int = 0
    all_gathers: int = 0
    broadcasts: int = 0
    tensors: int = 0
    bytes: int = 0  # bytes of yielded tensors
    max_bucket_bytes: int = 0  # largest buffer a bucket materialised on this rank
    plan_built: bool = False  # False: the cached plan was reused


# ---------------------------------------------------------------------------------------------
# Plan


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _itemsize(dtype_name: str) -> int:
    return getattr(torch, dtype_name).itemsize


def _param_plans(resolved, ctx: MappingContext, tp_size: int) -> list[ParamPlan]:
    plans = []
    for index, (r, p) in enumerate(resolved):
        transform = r.mapping.transform
        replicated = isinstance(transform, Replicated)
        meta = torch.empty(tuple(p.shape), dtype=p.dtype, device="meta")
        shards = [meta] if replicated else [meta] * tp_size
        hf_shapes = [tuple(t.shape) for t in transform.to_hf(shards, ctx)]
        if len(hf_shapes) != len(r.hf_names):
            raise RuntimeError(f"{r.global_name}: transform gives {len(hf_shapes)} tensors for {len(r.hf_names)} HF names")
        plans.append(ParamPlan(index, r.global_name, tuple(p.shape), (not replicated) and tp_size > 1,
                               tuple(zip(r.hf_names, hf_shapes))))
    return plans


def plan_buckets(params: Sequence[ParamPlan], dtypes: Sequence[str], *, stage: int, tp_size: int,
                 bucket_bytes: int) -> list[Bucket]:
    """Greedy split of one stage's parameters (in order) into buckets of one dtype and at most
    ``bucket_bytes`` materialised bytes (a larger single parameter gets a bucket of its own)."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    buckets: list[Bucket] = []
    current: list[ParamPlan] = []
    current_dtype: Optional[str] = None
    gathered_numel = hf_numel = 0

    for plan, dtype in zip(params, dtypes):
        itemsize = _itemsize(dtype)
        g = gathered_numel + plan.shard_numel * (tp_size if plan.gathered else 1)
        h = hf_numel + plan.hf_numel
        if current and (dtype != current_dtype or max(g, h) * itemsize > bucket_bytes):
            buckets.append(Bucket(stage, current_dtype, tuple(current), tp_size))
            current = []
            g = plan.shard_numel * (tp_size if plan.gathered else 1)
            h = plan.hf_numel
        current_dtype = dtype
        current.append(plan)
        gathered_numel, hf_numel = g, h
    if current:
        buckets.append(Bucket(stage, current_dtype, tuple(current), tp_size))
    return buckets


def _exported(model_chunks):
    return [(r, p) for r, p in resolve_params(model_chunks) if r.mapping.export]


def _fingerprint(resolved, tp_size: int, pp_size: int, stage: int, bucket_bytes: int) -> tuple:
    return (tp_size, pp_size, stage, bucket_bytes,
            tuple((r.global_name, tuple(p.shape), p.dtype) for r, p in resolved))


def build_plan(model_chunks, resolved, *, bucket_bytes: int) -> TransferPlan:
    """Build the transfer plan (a collective over the PP group: stages exchange their bucket lists)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    stage = parallel_state.get_pipeline_model_parallel_rank()
    ctx = MappingContext.from_extras(unwrap(model_chunks[0]).extras)
    params = _param_plans(resolved, ctx, tp_size)
    mine = plan_buckets(params, [_dtype_name(p.dtype) for _, p in resolved], stage=stage, tp_size=tp_size,
                        bucket_bytes=bucket_bytes)
    if pp_size == 1:
        return TransferPlan(tuple(mine), tp_size, pp_size, stage, bucket_bytes)
    per_stage: list = [None] * pp_size
    dist.all_gather_object(per_stage, mine, group=parallel_state.get_pipeline_model_parallel_group())
    buckets = tuple(b for stage_buckets in per_stage for b in stage_buckets)
    return TransferPlan(buckets, tp_size, pp_size, stage, bucket_bytes)


# Cache: unwrapped first chunk (weakly) -> {(number of chunks, bucket_bytes): (chunk ids, fingerprint, plan)}.
_PLAN_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def get_plan(model_chunks, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES, resolved=None) -> tuple[TransferPlan, bool]:
    """The cached plan of these chunks, rebuilt when the model (or its shapes, dtypes, layout) changed.

    Returns ``(plan, built)``. Ranks agree on rebuilding through one tiny all-reduce over the
    model-parallel group, so a rank whose cache missed never leaves the others waiting.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    resolved = _exported(model_chunks) if resolved is None else resolved
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    stage = parallel_state.get_pipeline_model_parallel_rank()
    fingerprint = _fingerprint(resolved, tp_size, pp_size, stage, bucket_bytes)
    chunk_ids = tuple(id(unwrap(c)) for c in model_chunks)
    slot = _PLAN_CACHE.setdefault(unwrap(model_chunks[0]), {})
    key = (len(model_chunks), bucket_bytes)
    cached = slot.get(key)
    hit = cached is not None and cached[0] == chunk_ids and cached[1] == fingerprint
    if tp_size * pp_size > 1:
        device = resolved[0][1].device if resolved else torch.device("cpu")
        flag = torch.tensor([0 if hit else 1], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=parallel_state.get_model_parallel_group())
        hit = not bool(flag.item())
    if hit:
        return cached[2], False
    plan = build_plan(model_chunks, resolved, bucket_bytes=bucket_bytes)
    slot[key] = (chunk_ids, fingerprint, plan)
    return plan, True


# ---------------------------------------------------------------------------------------------
# Streaming


class _Workspace:
    """One byte buffer for the all-gather's send and receive buffers, reused by every bucket this rank
    owns in one export (never handed to the consumer), so its pages are touched once per export, not
    once per bucket. Allocated at the first owned bucket, released after the last one."""

    def __init__(self, nbytes: int, device):
        self.nbytes, self.device, self.buffer = nbytes, device, None

    def take(self, offset_bytes: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
        if self.buffer is None:
            self.buffer = torch.empty(self.nbytes, dtype=torch.uint8, device=self.device)
        start = -(-offset_bytes // 64) * 64  # keep views aligned
        return self.buffer[start:start + numel * dtype.itemsize].view(dtype)

    def aliases(self, tensor: torch.Tensor) -> bool:
        if self.buffer is None:
            return False
        base = self.buffer.data_ptr()
        return base <= tensor.data_ptr() < base + self.buffer.numel()

    def release(self) -> None:
        self.buffer = None


def _workspace_bytes(plan: "TransferPlan") -> int:
    """Room for the largest owned bucket's gathered shards, plus its send staging when it stages
    several parameters (a single parameter is sent from the model's own tensor)."""
    def need(b: Bucket) -> int:
        send = -(-b.gather_numel * _itemsize(b.dtype) // 64) * 64
        staged = sum(p.gathered for p in b.params) > 1
        return send * b.tp_size + (send if staged else 0) + 64

    return max((need(b) for b in plan.buckets if b.stage == plan.stage and b.gather_numel), default=0)


def _fill_bucket(bucket: Bucket, resolved, ctx: MappingContext, stats: ExportStats,
                 flat: bool, workspace: Optional[_Workspace] = None) -> tuple[list[torch.Tensor], Optional[torch.Tensor]]:
    """Owner side: gather the bucket's TP shards, transform to HF tensors.

    With ``flat`` each HF tensor is copied into one new flat buffer of ``bucket.hf_numel`` elements
    (allocated once the all-gather's send buffer is freed) and ``(views of it, buffer)`` are returned;
    without it ``(the transform's own tensors, None)``.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    tp = bucket.tp_size
    gathered = None
    if bucket.gather_numel:
        parts = [resolved[p.index][1].detach().reshape(-1) for p in bucket.params if p.gathered]
        dtype, numel = parts[0].dtype, bucket.gather_numel
        if workspace is not None and workspace.nbytes:
            gathered = workspace.take(0, tp * numel, dtype)
            send = parts[0] if len(parts) == 1 else torch.cat(parts, out=workspace.take(tp * numel * dtype.itemsize, numel, dtype))
        else:
            gathered = torch.empty(tp * numel, dtype=dtype, device=parts[0].device)
            send = parts[0] if len(parts) == 1 else torch.cat(parts)  # one parameter: no staging copy
        del parts
        dist.all_gather_into_tensor(gathered, send, group=parallel_state.get_tensor_model_parallel_group())
        stats.all_gathers += 1
        del send
        gathered = gathered.view(tp, -1)
        stats.max_bucket_bytes = max(stats.max_bucket_bytes, gathered.numel() * gathered.element_size())
    out = None
    if flat:
        device = resolved[bucket.params[0].index][1].device
        out = torch.empty(bucket.hf_numel, dtype=getattr(torch, bucket.dtype), device=device)
    tensors: list[torch.Tensor] = []
    offset, hf_offset = 0, 0
    with torch.no_grad():
        for plan in bucket.params:
            r, param = resolved[plan.index]
            if plan.gathered:
                shards = [gathered[rank, offset:offset + plan.shard_numel].view(plan.shard_shape) for rank in range(tp)]
                offset += plan.shard_numel
            else:
                shards = [param.detach()]
            for (name, shape), tensor in zip(plan.hf, r.mapping.transform.to_hf(shards, ctx)):
                if tuple(tensor.shape) != shape:
                    raise RuntimeError(f"{name}: planned shape {shape}, transform gave {tuple(tensor.shape)}")
                if out is None:
                    # Never hand out a view of the reused workspace (the transforms copy, but be sure).
                    tensors.append(tensor.clone() if workspace is not None and workspace.aliases(tensor) else tensor)
                else:
                    view = out[hf_offset:hf_offset + tensor.numel()].view(shape)
                    view.copy_(tensor)
                    tensors.append(view)
                    hf_offset += tensor.numel()
            del shards
    materialised = out.numel() * out.element_size() if out is not None else sum(t.numel() * t.element_size() for t in tensors)
    stats.max_bucket_bytes = max(stats.max_bucket_bytes, materialised)
    return tensors, out


def export_hf_weights(model_chunks, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                      stats: Optional[ExportStats] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream the model as full HF tensors ``(hub_name, tensor)`` on every rank (see module doc).

    ``bucket_bytes`` bounds the memory one bucket materialises and sets how many parameters share one
    all-gather / broadcast. Pass an ``ExportStats`` to learn the collective counts and bucket sizes.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    stats = ExportStats() if stats is None else stats
    resolved = _exported(model_chunks)
    plan, built = get_plan(model_chunks, bucket_bytes=bucket_bytes, resolved=resolved)
    stats.plan_built = built
    ctx = MappingContext.from_extras(unwrap(model_chunks[0]).extras)
    device = resolved[0][1].device if resolved else torch.device("cpu")
    pp_group = parallel_state.get_pipeline_model_parallel_group() if plan.pp_size > 1 else None
    workspace = _Workspace(_workspace_bytes(plan), device)
    last_gather = max((i for i, b in enumerate(plan.buckets) if b.stage == plan.stage and b.gather_numel), default=-1)
    for index, bucket in enumerate(plan.buckets):
        owner = bucket.stage == plan.stage
        names = [name for p in bucket.params for name, _ in p.hf]
        if plan.pp_size == 1:
            tensors, _ = _fill_bucket(bucket, resolved, ctx, stats, flat=False, workspace=workspace)
        else:
            if owner:
                # A bucket of one tensor (the big embedding / output layer) is broadcast as it is.
                single = len(names) == 1
                tensors, flat = _fill_bucket(bucket, resolved, ctx, stats, flat=not single, workspace=workspace)
                if single:
                    tensors = [tensors[0].contiguous()]
                    flat = tensors[0]
            else:
                flat = torch.empty(bucket.hf_numel, dtype=getattr(torch, bucket.dtype), device=device)
                stats.max_bucket_bytes = max(stats.max_bucket_bytes, flat.numel() * flat.element_size())
                shapes = [shape for p in bucket.params for _, shape in p.hf]
                tensors = [t.view(s) for t, s in zip(torch.split(flat, [math.prod(s) for s in shapes]), shapes)]
            if index == last_gather:
                workspace.release()
            dist.broadcast(flat, src=dist.get_global_rank(pp_group, bucket.stage), group=pp_group)
            stats.broadcasts += 1
            del flat
        if index == last_gather:
            workspace.release()
        stats.buckets += 1
        # Hand the bucket out one tensor at a time, dropping our references as we go.
        tensors.reverse()
        for name in names:
            tensor = tensors.pop()
            stats.tensors += 1
            stats.bytes += tensor.numel() * tensor.element_size()
            yield name, tensor
        del tensors


def refresh_engine_weights(engine, model_chunks, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                           stats: Optional[ExportStats] = None) -> ExportStats:
    """The weight-sync step of a training iteration: wake the engine's weight memory, stream the
    current weights into it, then wake its KV cache. Collective over the model-parallel group."""
    stats = ExportStats() if stats is None else stats
    engine.wake_up(tags=["weights"])
    engine.update_weights(export_hf_weights(model_chunks, bucket_bytes=bucket_bytes, stats=stats))
    engine.wake_up(tags=["kv_cache"])
    return stats


# ---------------------------------------------------------------------------------------------
# Train / inference mismatch


def token_mult_prob_error(engine_logp, train_logp, mask=None) -> float:
    """Mean over response tokens of ``exp(|logp_engine - logp_train|)`` (1.0 = identical).

    Inputs are tensors or nested lists of the same shape; ``mask`` (bool / 0-1, same shape) selects the
    response tokens (default: all). Returns NaN when the mask selects nothing.
    """
    engine = torch.as_tensor(engine_logp, dtype=torch.float64)
    train = torch.as_tensor(train_logp, dtype=torch.float64)
    if engine.shape != train.shape:
        raise ValueError(f"log-prob shapes differ: {tuple(engine.shape)} vs {tuple(train.shape)}")
    keep = torch.ones_like(engine, dtype=torch.bool) if mask is None else torch.as_tensor(mask).bool()
    if keep.shape != engine.shape:
        raise ValueError(f"mask shape {tuple(keep.shape)} != log-prob shape {tuple(engine.shape)}")
    if not bool(keep.any()):
        return float("nan")
    return float(torch.exp((engine - train).abs())[keep].mean())
