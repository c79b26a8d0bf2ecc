"""Streaming writer for HF checkpoints: sharded safetensors + index, config, assets, atomically.

Tensors arrive one at a time (from a gather over TP/PP); at most one shard's worth is held before
it is flushed to disk. Shards are renamed ``model-0000i-of-0000N.safetensors`` once N is known.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch
from safetensors.torch import save_file

from .safetensors_io import INDEX_NAME, SINGLE_NAME

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


class ShardedSafetensorsWriter:
    """Collects tensors into shards of at most ``max_shard_bytes`` (a larger tensor gets its own)."""

    def __init__(self, directory: Path, max_shard_bytes: int, dtype: Optional[torch.dtype] = None):
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self.dtype = dtype
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []  # temporary file name, tensor names
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in names for _, names in self._shards):
            raise ValueError(f"tensor {name} written twice")
        if self.dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(self.dtype)
        tensor = tensor.detach().contiguous().cpu()
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        if not self._pending:
            return
        temp_name = f"shard-{len(self._shards):05d}.tmp"
        save_file(self._pending, str(self.directory / temp_name), metadata={"format": "pt"})
        self._shards.append((temp_name, sorted(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Flush, name the shards and write the index (only when there is more than one shard)."""
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
