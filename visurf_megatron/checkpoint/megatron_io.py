"""Megatron distributed checkpoints of the Qwen2.5-VL model: build, save, load, metadata.

A checkpoint directory is a megatron-core ``dist_checkpointing`` directory (reloadable under any
TP/PP) with the model under the ``model`` key, plus ``visurf_meta.json`` (the HF config it came
from, dtype, layout at save time) and ``hf_assets/`` (tokenizer, processor and generation files, so
the way back to HF needs nothing else). Training checkpoints add optimizer/RNG/data state under
other keys in the same directory; loaders here read the model only.
"""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

META_NAME = "visurf_meta.json"
ASSETS_DIR = "hf_assets"
LATEST_NAME = "latest_checkpointed_iteration.txt"
FORMAT_VERSION = 1
# Everything of an HF model directory except its weights.
HF_ASSET_PATTERNS = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
    "processor_config.json", "video_preprocessor_config.json", "generation_config.json",
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"unsupported dtype {dtype}")


def transformer_overrides(model_cfg) -> dict[str, Any]:
    """TransformerConfig fields from a ``config.ModelConfig``: FP8 (language tower) and recompute."""
    from visurf_megatron.models.qwen2_5_vl.specs import fp8_overrides

    out = dict(fp8_overrides(model_cfg.fp8, model_cfg.fp8_recipe, model_cfg.fp8_bf16_first_last_layers))
    if model_cfg.recompute == "full":
        out.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif model_cfg.recompute == "selective":
        out.update(recompute_granularity="selective")
    return out


def build_model(hf_config: Any, tp: int, pp: int, dtype: torch.dtype, *, initialize: bool = False,
                sequence_parallel: bool = False, backend: str = "local", fp8_vision: bool = False,
                config_overrides: Optional[dict] = None, **model_kwargs):
    """The Qwen2.5-VL model chunk of this rank (parallel_state must be set up already).

    ``initialize=False`` skips random init: converters overwrite every weight anyway, and random
    init of a 72B shard costs minutes. ``config_overrides`` go to both TransformerConfigs (see
    ``transformer_overrides``). With CUDA the model is built on the current GPU (megatron's own
    layers allocate their shards there); ``config_overrides={"use_cpu_initialization": True}``
    keeps it on the CPU.
    """
    from visurf_megatron.models.qwen2_5_vl.config import ParallelLayout, configs_from_hf
    from visurf_megatron.models.qwen2_5_vl.model import Qwen25VLModel

    lang, vision, extras = configs_from_hf(
        hf_config, ParallelLayout(tp=tp, pp=pp, sequence_parallel=sequence_parallel), params_dtype=dtype,
        perform_initialization=initialize, fp8_vision=fp8_vision, **(config_overrides or {}),
    )
    model = Qwen25VLModel(lang, vision, extras, backend=backend, **model_kwargs)
    if not lang.use_cpu_initialization:
        # megatron built its layers on the current GPU; the few plain torch modules (the patch
        # Conv3d, the norms) follow, so no caller ever holds a model split across devices.
        model.cuda(torch.cuda.current_device())
    if not initialize:
        mark_tensor_parallel_weights(model)
    return model, extras


def mark_tensor_parallel_weights(model) -> int:
    """Set the TP attributes megatron only sets inside its weight-init functions.

    With ``perform_initialization=False`` megatron-core 0.16 never marks Column/RowParallelLinear and
    VocabParallelEmbedding weights as tensor-parallel, and the grad-norm then counts only TP rank 0's
    shards (found by comparing TP1 and TP2 training). Returns the number of weights marked.
    """
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, set_tensor_model_parallel_attributes,
    )

    marked = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if weight is None or getattr(weight, "tensor_model_parallel", False):
            continue
        if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
            set_tensor_model_parallel_attributes(weight, True, 0, getattr(module, "stride", 1))
        elif isinstance(module, RowParallelLinear):
            set_tensor_model_parallel_attributes(weight, True, 1, getattr(module, "stride", 1))
        else:
            continue
        marked += 1
    return marked


def copy_hf_assets(src: Path, dst: Path) -> list[str]:
    """Copy the non-weight files of an HF model directory; returns the names copied."""
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in HF_ASSET_PATTERNS:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def write_meta(directory: Path, hf_config: dict, dtype: torch.dtype, tp: int, pp: int, **extra: Any) -> None:
    meta = {"format_version": FORMAT_VERSION, "hf_config": hf_config, "dtype": dtype_name(dtype),
            "saved_layout": {"tp": tp, "pp": pp}, **extra}
    (directory / META_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True))


def read_meta(directory: Path) -> dict:
    path = Path(directory) / META_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a visurf_megatron checkpoint (no {META_NAME})")
    meta = json.loads(path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported format_version {meta.get('format_version')}")
    return meta


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A checkpoint directory, or a training run's checkpoint root (its latest iteration)."""
    path = Path(path)
    if (path / META_NAME).is_file():
        return path
    latest = path / LATEST_NAME
    if latest.is_file():
        iteration = int(latest.read_text().strip())
        candidate = path / f"iter_{iteration:07d}"
        if (candidate / META_NAME).is_file():
            return candidate
        raise FileNotFoundError(f"{latest} points at {candidate}, which is not a complete checkpoint")
    raise FileNotFoundError(f"no checkpoint at {path} (neither {META_NAME} nor {LATEST_NAME})")


def model_sharded_state_dict(model_chunks) -> dict:
    from visurf_megatron.checkpoint.mapping import unwrap

    if len(model_chunks) == 1:
        return {"model": unwrap(model_chunks[0]).sharded_state_dict()}
    return {f"model{i}": unwrap(c).sharded_state_dict() for i, c in enumerate(model_chunks)}


def _in_process_save_strategy(sync_files: bool, stream=None):
    """megatron's ``torch_dist`` format, written by this process with torch's own DCP writer.

    megatron-core 0.16.1's writer (``FileSystemWriterAsync``) first clones every tensor that is a
    view (the SwiGLU ``linear_fc1`` halves: a quarter of a language layer) all at once, then starts a
    manager process and forks one writer per thread, even for a synchronous save. torch's
    ``FileSystemWriter`` with one thread writes the same files from this process, one tensor at a
    time (a view is cloned only while it is written). Planner, metadata and key translation are
    megatron's, so ``dist_checkpointing.load`` reads the result under any TP/PP as before.

    ``stream`` (e.g. ``hf_import.StreamedHFParams``) is told which tensors the save will write and
    sees each one just before it is written, and gives the writer the tensor to write in its place
    (filled lazily, in memory it recycles).
    """
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner, TorchDistSaveShardedStrategy, _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed.checkpoint.filesystem import FileSystem
    from torch.distributed.checkpoint.planner import WriteItemType

    from .safetensors_io import DropBehindStream

    class StreamingSavePlanner(MCoreSavePlanner):
        def finish_plan(self, new_plan):
            plan = super().finish_plan(new_plan)
            stream.expect(self.lookup_object(item.index) for item in plan.items
                          if item.type != WriteItemType.BYTE_IO)
            return plan

        def resolve_data(self, write_item):
            data = super().resolve_data(write_item)
            return stream.before_write(data) if isinstance(data, torch.Tensor) else data

    class DropBehindFileSystem(FileSystem):
        """Each rank's file is written once, start to end, and not read back: drop it behind."""

        @contextlib.contextmanager
        def create_stream(self, path, mode):
            if mode != "wb":
                with super().create_stream(path, mode) as stream:
                    yield stream
                return
            with DropBehindStream(open(path, "wb")) as stream:
                yield stream

    class InProcessTorchDistSave(TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict, checkpoint_dir):
            sharded_state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(
                sharded_state_dict, self.keep_only_main_replica)
            # A stream recycles memory, so it must see one tensor at a time; with CUDA present torch
            # would otherwise resolve tensors ahead of writing them (per_thread_copy_ahead).
            ahead = {"per_thread_copy_ahead": 0} if stream is not None else {}
            writer = dcp.FileSystemWriter(str(checkpoint_dir), single_file_per_rank=True, thread_count=1,
                                          sync_files=sync_files, **ahead)
            writer.fs = DropBehindFileSystem()
            planner = (StreamingSavePlanner if stream is not None else MCoreSavePlanner)(
                dedup_replicated_tensors=False, flatten_state_dict=False)
            # Every tensor is one torch.save zip record; its CRC-32 costs ~0.16 s per GiB and no
            # reader checks it (torch.load ignores it: a flipped data byte loads silently either way).
            crc32 = torch.serialization.get_crc32_options()
            torch.serialization.set_crc32_options(False)
            try:
                dcp.save(mcore_to_pyt_state_dict(sharded_state_dict, False), storage_writer=writer, planner=planner)
            finally:
                torch.serialization.set_crc32_options(crc32)
            if stream is not None:
                stream.close()

    return InProcessTorchDistSave("torch_dist", 1)


def save_model(model_chunks, directory: Path, extra_state: Optional[dict] = None, *, sync_files: bool = True,
               stream=None) -> None:
    """Collective: every rank calls it with its chunks; each shard is written once.

    ``sync_files=False`` skips the fsync of every file: the converters publish their output with
    an atomic rename and can simply be run again after a crash. ``stream``: see
    ``_in_process_save_strategy``.
    """
    from megatron.core import dist_checkpointing

    state = model_sharded_state_dict(model_chunks)
    if extra_state:
        state.update(extra_state)
    dist_checkpointing.save(state, str(directory), sharded_strategy=_in_process_save_strategy(sync_files, stream))


def load_model(model_chunks, directory: Path) -> None:
    """Collective: load the model weights (only) into this rank's chunks, whatever the saved layout."""
    from megatron.core import dist_checkpointing

    from visurf_megatron.checkpoint.mapping import unwrap

    loaded = dist_checkpointing.load(model_sharded_state_dict(model_chunks), str(directory))
    if len(model_chunks) == 1:
        unwrap(model_chunks[0]).load_state_dict(loaded["model"], strict=True)
    else:
        for i, chunk in enumerate(model_chunks):
            unwrap(chunk).load_state_dict(loaded[f"model{i}"], strict=True)


def _in_place_reader(base):
    """``base`` (a DCP ``FileSystemReader``) reading plain tensors straight into their destination.

    torch's reader ``torch.load``s every saved chunk into new memory and copies the requested part
    into the parameter: every byte is allocated, faulted in and copied once more than needed. The
    torch_dist format stores each chunk as one ``torch.save`` record; loading that record with
    ``map_location="meta"`` reads only its pickle and gives the bytes' offset, so a request for
    whole rows of a contiguous chunk, into a contiguous destination of the same dtype, is one
    ``preadv`` into the parameter. Any other request (other layouts, transforms) goes to ``base``.
    """
    import dataclasses

    from torch.distributed.checkpoint.planner import LoadItemType

    from .safetensors_io import read_exactly

    class InPlaceReader(base):
        def read_data(self, plan, planner):
            rest = []
            with contextlib.ExitStack() as files:
                opened: dict[str, Any] = {}
                for req in plan.items:
                    if not self._read_in_place(req, planner, opened, files):
                        rest.append(req)
            return super().read_data(dataclasses.replace(plan, items=rest), planner)

        def _read_in_place(self, req, planner, opened, files) -> bool:
            info = self.storage_data[req.storage_index]
            if req.type != LoadItemType.TENSOR or info.transform_descriptors:
                return False
            if info.relative_path not in opened:
                opened[info.relative_path] = files.enter_context(open(Path(self.path) / info.relative_path, "rb"))
            stream = opened[info.relative_path]
            saved = torch.load(self._slice_file(stream, info), map_location="meta", weights_only=True)
            offset = getattr(saved.untyped_storage(), "_checkpoint_offset", None)
            target = planner.resolve_tensor(req).detach()
            lengths, starts = tuple(req.lengths), tuple(req.storage_offsets)
            if (offset is None or not saved.is_contiguous() or saved.storage_offset() or not saved.dim()
                    or lengths[1:] != tuple(saved.shape[1:]) or any(starts[1:]) or target.dtype != saved.dtype
                    or target.device.type != "cpu" or not target.is_contiguous() or tuple(target.shape) != lengths):
                return False
            row_bytes = saved[0].numel() * saved.element_size()
            read_exactly(stream.fileno(), target, info.offset + offset + starts[0] * row_bytes, info.relative_path)
            planner.commit_tensor(req, target)
            return True

    return InPlaceReader


class ParameterLoader:
    """Loads parameters of this rank's chunks from a dist checkpoint in place, a group at a time.

    For the way out to HF: ``fetch`` reads a parameter (and the ones scheduled right after it, up to
    ``group_bytes``) straight into its storage, ``release`` frees it once exported, so a rank
    never holds more than a group plus what is in flight (in one block of memory that the next
    group reuses, see ``_place``), instead of its whole shard plus
    ``dist_checkpointing.load``'s merged copies. Reads use torch DCP without collectives (each rank
    reads what it needs, whatever layout saved the checkpoint), with megatron's key translation and
    planner, exactly as ``dist_checkpointing.load`` does.
    """

    def __init__(self, model_chunks, directory: Path, schedule, group_bytes: int = 512 * 2**20):
        from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
        from megatron.core.dist_checkpointing.strategies.cached_metadata_filesystem_reader import (
            CachedMetadataFileSystemReader,
        )

        from visurf_megatron.checkpoint.mapping import unwrap

        self._reader = _in_place_reader(CachedMetadataFileSystemReader)(str(directory))  # .metadata read once
        self._group_bytes = group_bytes
        state = model_sharded_state_dict(model_chunks)
        self._shards: dict[int, list] = {}  # id(param) -> its ShardedTensors (views of the parameter)
        self._views: dict[int, list] = {}
        for chunk, sharded in zip(model_chunks, state.values()):
            for name, param in unwrap(chunk).named_parameters():
                entry = sharded[name]
                if isinstance(entry, ShardedTensorFactory):  # SwiGLU fc1: two views, one per half
                    entry = entry.build()
                entries = entry if isinstance(entry, list) else [entry]
                if not all(isinstance(e, ShardedTensor) for e in entries):
                    raise TypeError(f"{name}: unexpected sharded state entry {type(entry).__name__}")
                if any(e.data.untyped_storage().data_ptr() != param.untyped_storage().data_ptr() for e in entries):
                    raise RuntimeError(f"{name}: megatron's sharded tensor is not a view of its parameter; "
                                       "cannot load in place")
                self._shards[id(param)] = entries
                # Each view's geometry relative to the parameter, to re-create it on the arena (_place).
                self._views[id(param)] = [(e.data.shape, e.data.stride(), e.data.storage_offset() - param.storage_offset())
                                          for e in entries]
        self._schedule = list(schedule)
        self._position = {id(p): i for i, p in enumerate(self._schedule)}
        self._loaded: set[int] = set()
        self._live: set[int] = set()  # loaded, not yet released
        self._arena: Optional[torch.Tensor] = None

    def check(self) -> None:
        """Fail early (before any collective streaming) if a scheduled tensor is missing or reshaped."""
        metadata = self._reader.read_metadata().state_dict_metadata
        problems = []
        for param in self._schedule:
            for sh in self._shards[id(param)]:
                if sh.key not in metadata:
                    problems.append(f"{sh.key} is missing")
                elif tuple(metadata[sh.key].size) != tuple(sh.global_shape):
                    problems.append(f"{sh.key} has shape {tuple(metadata[sh.key].size)}, the model needs "
                                    f"{tuple(sh.global_shape)}")
        if problems:
            raise ValueError(f"{len(problems)} tensors do not match the model: " + "; ".join(problems[:10]))
        for param in self._schedule:  # shapes are equal: no zero-fill for a shorter saved vocabulary
            for sh in self._shards[id(param)]:
                sh.allow_shape_mismatch = False

    def fetch(self, param: torch.Tensor) -> torch.Tensor:
        if id(param) not in self._loaded:
            start = self._position[id(param)]
            group, size = [], 0
            for candidate in self._schedule[start:]:
                nbytes = candidate.numel() * candidate.element_size()
                if group and size + nbytes > self._group_bytes:
                    break
                if id(candidate) not in self._loaded:
                    group.append(candidate)
                    size += nbytes
            self._load(group)
        return param

    def _load(self, params) -> None:
        import torch.distributed.checkpoint as dcp
        from megatron.core.dist_checkpointing.strategies.torch import (
            MCoreLoadPlanner, _replace_state_dict_keys_with_sharded_keys, mcore_to_pyt_state_dict,
        )

        from torch.distributed.checkpoint.api import CheckpointException

        self._place(params)
        sharded = {f"{i}.{j}": sh for i, p in enumerate(params) for j, sh in enumerate(self._shards[id(p)])}
        by_key, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded)
        try:
            dcp.load(mcore_to_pyt_state_dict(by_key, True), storage_reader=self._reader, no_dist=True,
                     planner=MCoreLoadPlanner(shapes_validation_sharded_tensors=list(sharded.values())))
        except CheckpointException as exc:
            # A BaseException in torch, its text a whole traceback whose last line is the cause:
            # make it an ordinary error that callers can catch and report in one line.
            cause = [line.strip() for line in str(exc).splitlines() if line.strip()][-1:]
            keys = sorted(by_key)
            raise RuntimeError(f"cannot read {keys[0]}{' and others' if len(keys) > 1 else ''}: "
                               f"{cause[0] if cause else type(exc).__name__}") from None
        self._loaded.update(id(p) for p in params)
        self._live.update(id(p) for p in params)

    def _place(self, params) -> None:
        """Point the group's parameters (and their sharded views) at one reused block of memory.

        Fresh memory costs a page fault per 4 KiB on first touch (on a VM, often a host fault too):
        about as long as reading the bytes. Once every earlier group is released, the next group
        reuses the same block, so a rank touches new memory only for its largest group.
        """
        offsets, need = [], 0
        for param in params:
            offsets.append(need)
            need += -(-param.numel() * param.element_size() // 64) * 64  # 64-byte aligned
        if self._live or self._arena is None or self._arena.numel() < need:
            # Live parameters keep the previous block alive through their own views.
            self._arena = torch.empty(need, dtype=torch.uint8, device=params[0].device if params else "cpu")
        for param, offset in zip(params, offsets):
            nbytes = param.numel() * param.element_size()
            param.data = self._arena[offset:offset + nbytes].view(param.dtype).view(param.shape)
            for sh, (shape, stride, relative) in zip(self._shards[id(param)], self._views[id(param)]):
                sh.data = torch.as_strided(param.data, shape, stride, param.data.storage_offset() + relative)

    def release(self, param: torch.Tensor) -> None:
        """Free a parameter's memory (the model is unusable afterwards: export only)."""
        self._shards.pop(id(param), None)
        self._live.discard(id(param))
        param.data = torch.empty(0, dtype=param.dtype, device=param.device)
