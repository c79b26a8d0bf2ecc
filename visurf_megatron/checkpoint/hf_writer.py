"""Streaming writer for HF checkpoints: sharded safetensors + index, config, assets, atomically.

Tensors arrive one at a time (from a gather over TP/PP). Given the plan of what will arrive
(names, shapes, dtypes: the converter knows it up front), shard boundaries and every header are
known before the first byte, so each tensor goes to its file as it arrives and nothing is held.
Without a plan at most one shard's worth is held before it is flushed. Either way the files are
the same safetensors files (header written by ``_header``), renamed
``model-0000i-of-0000N.safetensors`` once N is known.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import torch

from .safetensors_io import DTYPES, INDEX_NAME, SINGLE_NAME, tensor_bytes

_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """``5GB`` -> 5_000_000_000 (HF convention: decimal units; KiB/MiB/GiB binary)."""
    if isinstance(text, int):
        return text
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError(f"cannot parse size {text!r}; use e.g. 5GB, 500MB or a byte count")
    number, unit = match.groups()
    return int(float(number) * _UNITS[(unit or "").upper()])


def _header(entries: Sequence[tuple[str, tuple[int, ...], torch.dtype]]) -> bytes:
    """A safetensors header for tensors stored back to back in this order (format spec: 8-byte
    little-endian length, JSON, padded with spaces so the data starts 8-byte aligned)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype in entries:
        size = torch.Size(shape).numel() * dtype.itemsize
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(len(text) + 8) % 8)
    return len(text).to_bytes(8, "little") + text


class ShardedSafetensorsWriter:
    """Writes tensors into shards of at most ``max_shard_bytes`` (a larger tensor gets its own).

    ``plan``: the (name, shape, dtype) of every tensor, in the order ``add`` will get them (dtype
    before the cast to ``dtype``); with it tensors are written as they arrive, not buffered.
    """

    def __init__(self, directory: Path, max_shard_bytes: int, dtype: Optional[torch.dtype] = None,
                 plan: Optional[Sequence[tuple[str, tuple[int, ...], torch.dtype]]] = None):
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self.dtype = dtype
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []  # temporary file name, tensor names
        self._seen: set[str] = set()
        self.total_bytes = 0
        self._plan = None if plan is None else [(n, tuple(s), self._out_dtype(d)) for n, s, d in plan]
        self._next = 0  # index in the plan of the next tensor
        self._file = None  # the shard being streamed: open file, tensors still to come in it
        self._left_in_file = 0

    def _out_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return self.dtype if self.dtype is not None and dtype.is_floating_point else dtype

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._seen:
            raise ValueError(f"tensor {name} written twice")
        self._seen.add(name)
        tensor = tensor.detach().to(self._out_dtype(tensor.dtype)).contiguous().cpu()
        size = tensor.numel() * tensor.element_size()
        self.total_bytes += size
        if self._plan is not None:
            self._stream(name, tensor)
            return
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor
        self._pending_bytes += size

    def _stream(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._plan) or self._plan[self._next] != (name, tuple(tensor.shape), tensor.dtype):
            expected = self._plan[self._next] if self._next < len(self._plan) else "nothing"
            raise ValueError(f"got {name} {tuple(tensor.shape)} {tensor.dtype}, the plan says {expected}")
        if self._file is None:
            entries = self._next_shard()
            self._file = self._open_shard(entries)
            self._left_in_file = len(entries)
        if tensor.numel():
            self._file.write(tensor_bytes(tensor))
        self._next += 1
        self._left_in_file -= 1
        if self._left_in_file == 0:
            self._file.close()
            self._file = None

    def _next_shard(self) -> list:
        """The planned tensors of the shard starting at ``self._next`` (same rule as buffering)."""
        entries, size = [], 0
        for name, shape, dtype in self._plan[self._next:]:
            nbytes = torch.Size(shape).numel() * dtype.itemsize
            if entries and size + nbytes > self.max_shard_bytes:
                break
            entries.append((name, shape, dtype))
            size += nbytes
        return entries

    def _flush(self) -> None:
        if not self._pending:
            return
        with self._open_shard([(n, tuple(t.shape), t.dtype) for n, t in self._pending.items()]) as f:
            for tensor in self._pending.values():
                if tensor.numel():
                    f.write(tensor_bytes(tensor))
        self._pending, self._pending_bytes = {}, 0

    def _open_shard(self, entries):
        """A new temporary shard file with its header written; the tensors' bytes follow in order."""
        temp_name = f"shard-{len(self._shards):05d}.tmp"
        f = open(self.directory / temp_name, "wb")
        f.write(_header(entries))
        self._shards.append((temp_name, sorted(n for n, _, _ in entries)))
        return f

    def close(self) -> list[str]:
        """Flush, name the shards and write the index (only when there is more than one shard)."""
        if self._plan is not None and self._next != len(self._plan):
            missing = [n for n, _, _ in self._plan[self._next:]]
            raise ValueError(f"{len(missing)} planned tensors never arrived: {', '.join(missing[:10])}")
        self._flush()
        if len(self._shards) == 1:
            os.replace(self.directory / self._shards[0][0], self.directory / SINGLE_NAME)
            return [SINGLE_NAME]
        total = len(self._shards)
        weight_map, files = {}, []
        for i, (temp_name, names) in enumerate(self._shards, start=1):
            final = f"model-{i:05d}-of-{total:05d}.safetensors"
            os.replace(self.directory / temp_name, self.directory / final)
            files.append(final)
            weight_map.update({n: final for n in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2))
        return files


def write_hf_tensors(tensors: Iterable[tuple[str, torch.Tensor]], directory: Path, *, max_shard_size: str | int = "5GB",
                     dtype: Optional[torch.dtype] = None) -> list[str]:
    writer = ShardedSafetensorsWriter(Path(directory), parse_size(max_shard_size), dtype)
    for name, tensor in tensors:
        writer.add(name, tensor)
    return writer.close()


def partial_dir(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.partial"


def prepare_output(out_dir: Path, overwrite: bool) -> Path:
    """Check the destination and return a fresh temporary directory beside it."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass --overwrite to replace it")
    temp = partial_dir(out_dir)
    if temp.exists():  # left by an interrupted run
        shutil.rmtree(temp)
    temp.mkdir(parents=True)
    return temp


def commit_output(temp: Path, out_dir: Path) -> None:
    """Move the finished temporary directory into place; an old output is removed only after."""
    out_dir = Path(out_dir)
    old = out_dir.parent / f".{out_dir.name}.old"
    if old.exists():
        shutil.rmtree(old)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(temp, out_dir)
    if old.exists():
        shutil.rmtree(old)


@contextmanager
def atomic_directory(out_dir: Path, overwrite: bool) -> Iterator[Path]:
    """Single-process form: yields the temporary directory, moves it into place on success."""
    temp = prepare_output(out_dir, overwrite)
    try:
        yield temp
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    commit_output(temp, out_dir)
