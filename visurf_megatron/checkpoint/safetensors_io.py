"""Lazy, read-only access to an HF safetensors checkpoint (single file or sharded with an index).

Only the tensors asked for are read, so a rank that owns a slice of a 72B model never holds the
whole checkpoint. Reads are ``pread``s into tensors we allocate (or the caller's destination,
``read_rows_into``), not an mmap: mapped file pages count in the reader's resident memory until
unmapped, which doubled the converters' peak (model + every page read so far).
"""
from __future__ import annotations

import ctypes
import json
import os
import sys
from pathlib import Path
from typing import Iterator, Optional

import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# safetensors dtype names (the format's spec) -> torch
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER = 100 * 2**20  # the format's own limit on the JSON header


class CheckpointError(RuntimeError):
    """The checkpoint directory is missing files or holds unreadable ones."""


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor (no copy). The tensor must outlive the view.

    Built on the raw address rather than ``.numpy()``, which marks the storage as not resizable
    for good.
    """
    if not tensor.is_contiguous():
        raise ValueError("tensor_bytes needs a contiguous tensor")
    if tensor.device.type != "cpu":
        raise ValueError("tensor_bytes needs a CPU tensor")
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr())).cast("B")


PAGE = 4096


class DropBehind:
    """Hands the page cache of what a converter wrote back to the kernel, every ``every`` bytes.

    A converter writes each byte once and reads none of it back; left in the page cache, a 7B-72B
    checkpoint evicts everything else and the writers stall once dirty pages pile up.
    ``posix_fadvise(DONTNEED)`` starts the write-back of the recorded ranges and drops pages
    already written back (measured on the 2-core dev VM: 4 GiB written in 9.1-9.7 s plain, 2.5-3.3 s
    with this every 256 MiB). Only whole pages this writer alone writes may be recorded: a page
    another rank still has to fill would be read back from disk for it. No-op without fadvise.
    """

    def __init__(self, every: int = 256 << 20):
        self.every = every
        self._ranges: list[tuple[int, int, int]] = []  # (fd, start, length), page-aligned
        self._pending = 0

    def wrote(self, fd: int, start: int, nbytes: int) -> None:
        """``[start, start + nbytes)`` of ``fd`` was written by this writer only (partial pages are skipped)."""
        first, end = -(-start // PAGE) * PAGE, (start + nbytes) // PAGE * PAGE
        if end > first:
            self._ranges.append((fd, first, end - first))
            self._pending += end - first
        if self._pending >= self.every:
            self.flush()

    def flush(self) -> None:
        ranges, self._ranges, self._pending = self._ranges, [], 0
        for fd, start, length in ranges:
            _drop_cached(fd, start, length)


def _drop_cached(fd: int, start: int, length: int) -> None:
    """``posix_fadvise(DONTNEED)`` on ``[start, start + length)``: write-back starts, clean pages go."""
    if length > 0 and hasattr(os, "posix_fadvise"):  # (length 0 would mean: to the end of the file)
        os.posix_fadvise(fd, start, length, os.POSIX_FADV_DONTNEED)


class DropBehindStream:
    """A binary output stream (as ``open(path, "wb")`` gives) that drops its pages behind it
    (``DropBehind``) as it is written: for files one writer fills from start to end."""

    def __init__(self, stream, every: int = 256 << 20):
        self._stream, self.every, self._unadvised = stream, every, 0

    def write(self, data) -> int:
        written = self._stream.write(data)
        self._unadvised += written
        if self._unadvised >= self.every:
            # All whole pages so far: those still being written back at the last call go now.
            self._stream.flush()
            _drop_cached(self._stream.fileno(), 0, self._stream.tell() // PAGE * PAGE)
            self._unadvised = 0
        return written

    def __getattr__(self, name):
        return getattr(self._stream, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stream.close()


def read_exactly(fd: int, out: torch.Tensor, offset: int, name) -> None:
    """Fill the contiguous CPU tensor ``out`` with the bytes of file ``fd`` from ``offset``
    (``name`` only for the error when the file ends first)."""
    view, done = tensor_bytes(out), 0
    while done < len(view):  # one read returns at most ~2 GiB on Linux
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise CheckpointError(f"{name} ended early at byte {offset + done}")
        done += got


class SafetensorsFile:
    """One ``.safetensors`` file: the header parsed up front, tensor bytes read on demand."""

    def __init__(self, path: Path):
        if sys.byteorder != "little":  # the format is little-endian; we read bytes as they are
            raise CheckpointError("safetensors files can only be read on a little-endian machine")
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise CheckpointError(f"cannot read {self.path}: {exc}") from exc
        try:
            self.entries = self._parse_header()
        except BaseException:
            os.close(self._fd)
            raise

    def _parse_header(self) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
        size = os.fstat(self._fd).st_size
        raw = os.pread(self._fd, 8, 0)
        length = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        if not 0 < length <= min(_MAX_HEADER, size - 8):
            raise CheckpointError(f"cannot read {self.path}: not a safetensors file (header length {length})")
        try:
            header = json.loads(os.pread(self._fd, length, 8))
        except ValueError as exc:
            raise CheckpointError(f"cannot read {self.path}: bad header ({exc})") from exc
        self.data_start = 8 + length
        entries = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype, shape, (begin, end) = DTYPES[info["dtype"]], tuple(info["shape"]), info["data_offsets"]
            except (KeyError, TypeError, ValueError) as exc:
                raise CheckpointError(f"cannot read {self.path}: bad header entry for {name} ({exc!r})") from exc
            expected = torch.Size(shape).numel() * dtype.itemsize
            if end - begin != expected or begin < 0:
                raise CheckpointError(f"cannot read {self.path}: {name} has {end - begin} bytes, its shape needs {expected}")
            if self.data_start + end > size:
                raise CheckpointError(f"cannot read tensor {name} from {self.path.name}: the file is truncated "
                                      f"({size} bytes, the tensor ends at {self.data_start + end})")
            entries[name] = (dtype, shape, self.data_start + begin, self.data_start + end)
        return entries

    def read_into(self, out: torch.Tensor, offset: int) -> None:
        """Fill the contiguous CPU tensor ``out`` with the file's bytes from ``offset``."""
        read_exactly(self._fd, out, offset, self.path)

    def read_strided_into(self, out: torch.Tensor, offset: int, stride: int) -> None:
        """Fill ``out`` (contiguous, 2-D) row by row with ``out``'s row width of bytes every ``stride``
        bytes from ``offset``: a column range of a row-major tensor, read without the other columns.

        One ``preadv`` takes up to ~500 rows; the bytes between wanted rows land in a scratch buffer
        reused for every gap (cheaper than a read per row of a narrow tensor).
        """
        rows = out.shape[0] if out.dim() else 1
        view = tensor_bytes(out)
        width = len(view) // rows if rows else 0
        gap = stride - width
        if gap < 0:
            raise ValueError(f"rows of {width} bytes do not fit a stride of {stride}")
        if gap == 0:
            return self.read_into(out, offset)
        scratch = memoryview(bytearray(gap))
        per_call = max(1, (os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024) // 2)
        for first in range(0, rows, per_call):
            last = min(rows, first + per_call)
            buffers = []
            for row in range(first, last):
                buffers.append(view[row * width:(row + 1) * width])
                if row + 1 < last:
                    buffers.append(scratch)
            want = sum(len(b) for b in buffers)
            got = os.preadv(self._fd, buffers, offset + first * stride)
            if got != want:  # regular files return short reads only at their end
                raise CheckpointError(f"{self.path} ended early near byte {offset + first * stride + got}")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class LazySlice:
    """One tensor of a checkpoint, read only when indexed: ``[a:b]`` reads just those rows."""

    def __init__(self, file: SafetensorsFile, key: str):
        self._file, self.key = file, key
        self.dtype, self.shape, self._begin, _ = file.entries[key]

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def read_rows_into(self, out: torch.Tensor, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        """Read rows [start, stop) straight into ``out`` (contiguous, same dtype and size); returns ``out``."""
        stop = (self.shape[0] if self.shape else 1) if stop is None else stop
        row_bytes = torch.Size(self.shape[1:]).numel() * self.dtype.itemsize
        if (out.dtype != self.dtype or not out.is_contiguous() or out.device.type != "cpu"
                or out.numel() * out.element_size() != (stop - start) * row_bytes):
            raise ValueError(f"{self.key}: cannot read rows {start}:{stop} of {self.dtype} {self.shape} into "
                             f"{out.dtype} {tuple(out.shape)}")
        self._file.read_into(out, self._begin + start * row_bytes)
        return out

    def read_columns_into(self, out: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Read columns [start, stop) of a 2-D tensor straight into ``out`` (contiguous, same dtype)."""
        if (len(self.shape) != 2 or out.dtype != self.dtype or not out.is_contiguous() or out.device.type != "cpu"
                or tuple(out.shape) != (self.shape[0], stop - start) or not 0 <= start <= stop <= self.shape[1]):
            raise ValueError(f"{self.key}: cannot read columns {start}:{stop} of {self.dtype} {self.shape} into "
                             f"{out.dtype} {tuple(out.shape)}")
        item = self.dtype.itemsize
        if out.numel():
            self._file.read_strided_into(out, self._begin + start * item, self.shape[1] * item)
        return out

    def read(self) -> torch.Tensor:
        """The whole tensor."""
        return self.read_rows_into(torch.empty(self.shape, dtype=self.dtype))

    def __getitem__(self, index) -> torch.Tensor:
        index = index if isinstance(index, tuple) else (index,)
        first = index[0] if index else slice(None)
        if not self.shape or not isinstance(first, slice) or first.step not in (None, 1):
            return self.read()[index].contiguous()
        start, stop, _ = first.indices(self.shape[0])
        stop = max(start, stop)
        second = index[1] if len(index) == 2 else None
        if (len(self.shape) == 2 and (start, stop) == (0, self.shape[0]) and isinstance(second, slice)
                and second.step in (None, 1)):  # [:, a:b]: read only those columns
            a, b, _ = second.indices(self.shape[1])
            b = max(a, b)
            return self.read_columns_into(torch.empty((self.shape[0], b - a), dtype=self.dtype), a, b)
        rows = self.read_rows_into(torch.empty((stop - start,) + self.shape[1:], dtype=self.dtype), start, stop)
        return rows if len(index) == 1 else rows[(slice(None),) + index[1:]].contiguous()


class HFCheckpointReader:
    """``keys()`` / ``__getitem__`` / ``shape()`` over every tensor of the checkpoint, opened lazily."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / INDEX_NAME
        single = self.directory / SINGLE_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index} has no weight_map")
            self._file_of = dict(weight_map)
        elif single.is_file():
            self._file_of = None
        else:
            raise CheckpointError(f"no {SINGLE_NAME} or {INDEX_NAME} in {self.directory}")
        self._files: dict[str, SafetensorsFile] = {}
        if self._file_of is None:
            self._file_of = {key: SINGLE_NAME for key in self._file(SINGLE_NAME).entries}

    def _file(self, filename: str) -> SafetensorsFile:
        if filename not in self._files:
            path = self.directory / filename
            if not path.is_file():
                raise CheckpointError(f"shard {path} listed in the index does not exist")
            self._files[filename] = SafetensorsFile(path)
        return self._files[filename]

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.get_slice(key).read()

    def get_slice(self, key: str) -> LazySlice:
        """A lazy view of one tensor: ``[a:b]`` reads only those rows (``[:, a:b]`` reads the tensor)."""
        if key not in self._file_of:
            raise KeyError(key)
        file = self._file(self._file_of[key])
        if key not in file.entries:
            raise CheckpointError(f"tensor {key} is listed in the index but not in {self._file_of[key]}")
        return LazySlice(file, key)

    def close(self) -> None:
        for file in self._files.values():
            file.close()
        self._files.clear()

    def __enter__(self) -> "HFCheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_hf_checkpoint(directory: str | Path) -> HFCheckpointReader:
    return HFCheckpointReader(directory)
