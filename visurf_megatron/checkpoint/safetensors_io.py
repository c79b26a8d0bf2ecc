"""Lazy, read-only access to an HF safetensors checkpoint (single file or sharded with an index).

Only the tensors asked for are read, so a rank that owns a slice of a 72B model never holds the
whole checkpoint.
"""
from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class CheckpointError(RuntimeError):
    """The checkpoint directory is missing files or holds unreadable ones."""


class LazySlice:
    """safetensors' slice with read errors (a truncated file) turned into ``CheckpointError``."""

    def __init__(self, inner, key: str, filename: str):
        self._inner, self.key, self.filename = inner, key, filename

    def get_shape(self) -> list[int]:
        return list(self._inner.get_shape())

    def __getitem__(self, index) -> torch.Tensor:
        try:
            return self._inner[index]
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types for bad files
            raise CheckpointError(f"cannot read tensor {self.key} from {self.filename}: {exc}") from exc


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
        self._stack = ExitStack()
        self._handles: dict[str, object] = {}
        if self._file_of is None:
            self._file_of = {key: SINGLE_NAME for key in self._handle(SINGLE_NAME).keys()}

    def _handle(self, filename: str):
        if filename not in self._handles:
            path = self.directory / filename
            if not path.is_file():
                raise CheckpointError(f"shard {path} listed in the index does not exist")
            try:
                self._handles[filename] = self._stack.enter_context(safe_open(str(path), framework="pt"))
            except Exception as exc:  # noqa: BLE001 - safetensors raises several types for bad files
                raise CheckpointError(f"cannot read {path}: {exc}") from exc
        return self._handles[filename]

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._file_of:
            raise KeyError(key)
        try:
            return self._handle(self._file_of[key]).get_tensor(key)
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - truncated files fail here, name the tensor
            raise CheckpointError(f"cannot read tensor {key} from {self._file_of[key]}: {exc}") from exc

    def get_slice(self, key: str) -> "LazySlice":
        """A lazy view of one tensor: ``[a:b]`` / ``[:, a:b]`` read only those rows / columns."""
        if key not in self._file_of:
            raise KeyError(key)
        return LazySlice(self._handle(self._file_of[key]).get_slice(key), key, self._file_of[key])

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

    def __enter__(self) -> "HFCheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_hf_checkpoint(directory: str | Path) -> HFCheckpointReader:
    return HFCheckpointReader(directory)
