"""Writers for HF checkpoints: sharded safetensors + index, and the atomic output directory.

Two ways to write the same files (headers from ``_header``, shards filled in order up to a size):
``ShardedSafetensorsWriter`` takes whole tensors one at a time and buffers one shard;
``ShardPlan`` + ``SlotWriter`` fix every file and offset from the names, shapes and dtypes alone,
so that every rank of a TP/PP world writes its own parts of the tensors in place, at once.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import torch

from .safetensors_io import DTYPES, INDEX_NAME, SINGLE_NAME, DropBehind, tensor_bytes

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


def shard_groups(entries: Sequence[tuple[str, tuple[int, ...], torch.dtype]], max_shard_bytes: int) -> list[list]:
    """Consecutive entries grouped into shards of at most ``max_shard_bytes`` (a larger tensor alone)."""
    groups, size = [], 0
    for entry in entries:
        nbytes = torch.Size(entry[1]).numel() * entry[2].itemsize
        if not groups or size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += nbytes
    return groups


def shard_names(count: int) -> list[str]:
    return [SINGLE_NAME] if count == 1 else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def write_index(directory: Path, files: Sequence[tuple[str, Sequence[str]]], total_bytes: int) -> None:
    """``model.safetensors.index.json`` for (file name, tensor names) pairs; none for a single file."""
    if len(files) == 1:
        return
    weight_map = {name: file for file, names in files for name in names}
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    (Path(directory) / INDEX_NAME).write_text(json.dumps(index, indent=2))


class ShardedSafetensorsWriter:
    """Writes tensors as they come into shards of at most ``max_shard_bytes`` (one shard buffered)."""

    def __init__(self, directory: Path, max_shard_bytes: int, dtype: Optional[torch.dtype] = None):
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self.dtype = dtype
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []  # temporary file name, tensor names
        self._seen: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._seen:
            raise ValueError(f"tensor {name} written twice")
        self._seen.add(name)
        out_dtype = self.dtype if self.dtype is not None and tensor.dtype.is_floating_point else tensor.dtype
        tensor = tensor.detach().to(out_dtype).contiguous().cpu()
        size = tensor.numel() * tensor.element_size()
        self.total_bytes += size
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor
        self._pending_bytes += size

    def _flush(self) -> None:
        if not self._pending:
            return
        temp_name = f"shard-{len(self._shards):05d}.tmp"
        with open(self.directory / temp_name, "wb") as f:
            f.write(_header([(n, tuple(t.shape), t.dtype) for n, t in self._pending.items()]))
            for tensor in self._pending.values():
                if tensor.numel():
                    f.write(tensor_bytes(tensor))
        self._shards.append((temp_name, sorted(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Flush, name the shards and write the index (only when there is more than one shard)."""
        self._flush()
        names = shard_names(len(self._shards))
        for (temp_name, _), final in zip(self._shards, names):
            os.replace(self.directory / temp_name, self.directory / final)
        write_index(self.directory, [(final, tensors) for final, (_, tensors) in zip(names, self._shards)],
                    self.total_bytes)
        return names


@dataclass(frozen=True)
class TensorSlot:
    """Where a planned tensor's bytes go: file (index into the plan's files), byte offset, geometry."""

    file: int
    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize

    @property
    def matrix(self) -> tuple[int, int]:
        """(rows, columns) of the tensor seen as dim 0 x the rest (``transforms.as_matrix``)."""
        rows = self.shape[0] if self.shape else 1
        return rows, torch.Size(self.shape).numel() // rows if rows else 0


@dataclass(frozen=True)
class ShardPlan:
    """Every shard file of an HF checkpoint, fixed before any byte is written.

    Knowing names, shapes and dtypes up front fixes the files, their headers and each tensor's
    offset, so any number of ranks can write their parts of any tensor at the same time.
    """

    files: list[tuple[str, bytes, list[str]]]  # file name, header bytes, tensor names in order
    slots: dict[str, TensorSlot]
    total_bytes: int

    @classmethod
    def build(cls, entries: Sequence[tuple[str, tuple[int, ...], torch.dtype]], max_shard_bytes: int,
              dtype: Optional[torch.dtype] = None) -> "ShardPlan":
        """``dtype`` replaces the dtype of floating-point entries (the output dtype)."""
        entries = [(n, tuple(s), dtype if dtype is not None and d.is_floating_point else d) for n, s, d in entries]
        if len({n for n, _, _ in entries}) != len(entries):
            raise ValueError("the plan names a tensor twice")
        groups = shard_groups(entries, max_shard_bytes)
        files, slots, total = [], {}, 0
        for i, (name, group) in enumerate(zip(shard_names(len(groups)), groups)):
            header = _header(group)
            offset = len(header)
            for tensor, shape, tensor_dtype in group:
                slots[tensor] = TensorSlot(i, offset, shape, tensor_dtype)
                offset += slots[tensor].nbytes
            files.append((name, header, [n for n, _, _ in group]))
            total += offset - len(header)
        return cls(files, slots, total)

    def create_files(self, directory: Path) -> None:
        """Write every header and size every file (one rank, before anyone writes into them)."""
        for name, header, tensors in self.files:
            end = len(header) + sum(self.slots[t].nbytes for t in tensors)
            with open(Path(directory) / name, "wb") as f:
                f.write(header)
                f.truncate(end)

    def write_index(self, directory: Path) -> list[str]:
        write_index(directory, [(name, tensors) for name, _, tensors in self.files], self.total_bytes)
        return [name for name, _, _ in self.files]


class SlotWriter:
    """Writes blocks of planned tensors straight into their bytes in the shard files (``pwrite``).

    Any rank can use one on files that ``ShardPlan.create_files`` made; a block of full rows is one
    write, a block of some columns one write per row.
    """

    def __init__(self, directory: Path, plan: ShardPlan):
        self.directory, self.plan = Path(directory), plan
        self._fds: dict[int, int] = {}
        self.bytes_written = 0
        # Blocks of full rows are this rank's alone; column blocks share pages with other ranks.
        self._drop = DropBehind()

    def write(self, name: str, row: int, col: int, block: torch.Tensor) -> None:
        slot = self.plan.slots[name]
        rows, cols = slot.matrix
        if block.dim() != 2 or row < 0 or col < 0 or row + block.shape[0] > rows or col + block.shape[1] > cols:
            raise ValueError(f"{name}: a block of shape {tuple(block.shape)} at ({row}, {col}) does not fit "
                             f"the tensor's {rows} x {cols}")
        block = block.detach().to("cpu", slot.dtype)
        if block.stride(-1) != 1:
            block = block.contiguous()
        fd = self._fd(slot.file)
        item = slot.dtype.itemsize
        start = slot.offset + (row * cols + col) * item
        if block.shape[1] == cols and block.is_contiguous():
            self._pwrite(fd, tensor_bytes(block), start)
            self._drop.wrote(fd, start, block.numel() * item)
        elif block.numel():
            # One view over every row, sliced per row: a row-parallel tensor has thousands of rows.
            width, pitch = block.shape[1] * item, block.stride(0) * item
            span = block.as_strided(((block.shape[0] - 1) * block.stride(0) + block.shape[1],), (1,))
            view = tensor_bytes(span)
            for i in range(block.shape[0]):
                self._pwrite(fd, view[i * pitch:i * pitch + width], start + i * cols * item)

    def _pwrite(self, fd: int, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):  # one write moves at most ~2 GiB on Linux
            done += os.pwrite(fd, view[done:], offset + done)
        self.bytes_written += done

    def _fd(self, file: int) -> int:
        if file not in self._fds:
            self._fds[file] = os.open(self.directory / self.plan.files[file][0], os.O_WRONLY)
        return self._fds[file]

    def close(self) -> None:
        self._drop.flush()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


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
