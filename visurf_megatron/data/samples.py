"""Dataset records: one validated ``Sample`` per (image, query, answer), loaded from JSONL, Parquet or
an HF ``datasets`` ``save_to_disk`` directory.

Conventions the rest of the package relies on:

* **Coordinates.** A grounding/GUI/anomaly ``solution`` is in the pixel frame the model sees (the
  stored image, or the fixed square it is resized to, as in the VisionReasoner data);
  ``img_width``/``img_height`` are the original image size, which evaluation uses to map predictions
  back (see ``data/images.py``). Boxes are inclusive-pixel ``[x1, y1, x2, y2]``.
* **Images.** ``Sample.image`` is an absolute path when the image lives in a file. Images embedded
  in the data (an HF ``Image`` feature ``{"bytes", "path"}``, or raw bytes) are kept *encoded* in
  ``Sample.image_bytes`` (the compressed file, not decoded pixels: ~10x smaller) unless
  ``image_cache_dir`` is given, in which case they are written there once, named by content hash, so
  that a path exists for consumers in other processes (vLLM workers). ``Sample.load_image()`` works in
  both cases.
* **Row numbers** in errors are 1-based; for JSONL they equal the line number.
* Missing or unreadable images are never dropped silently: ``on_bad_row="error"`` raises
  ``DataValidationError`` naming the row, ``"skip"`` counts the row and records the reason.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

TASKS = ("grounding", "gui", "anomaly", "math", "chartqa", "docvqa", "existence")
# Tasks whose answer is a list of {"bbox_2d", "point_2d"} objects and which need an image.
OBJECT_TASKS = ("grounding", "anomaly")
IMAGE_TASKS = ("grounding", "gui", "anomaly", "existence")

# Columns with a meaning of their own; everything else goes to Sample.meta untouched.
_KNOWN = {"id", "task", "problem", "text", "question", "solution", "answer", "image", "img_width",
          "img_height", "choices", "mask"}


class DataValidationError(ValueError):
    """A row failed validation; ``row`` is 1-based, ``reason`` names the field."""

    def __init__(self, row: int, reason: str):
        super().__init__(f"row {row}: {reason}")
        self.row = row
        self.reason = reason


@dataclass
class Sample:
    id: str
    task: str
    image: str | None
    problem: str
    solution: Any
    img_width: int | None = None
    img_height: int | None = None
    choices: list[str] | None = None
    mask: str | None = None
    image_bytes: bytes | None = field(default=None, repr=False)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def has_image(self) -> bool:
        return self.image is not None or self.image_bytes is not None

    def load_image(self):
        """The image as an RGB ``PIL.Image`` (from the file or the in-memory bytes)."""
        from PIL import Image

        if self.image_bytes is not None:
            img = Image.open(io.BytesIO(self.image_bytes))
        elif self.image is not None:
            img = Image.open(self.image)
        else:
            raise ValueError(f"sample {self.id!r} has no image")
        return img.convert("RGB")

    def load_mask(self):
        """The ground-truth mask as a boolean numpy array (H, W), or None without a mask file."""
        if self.mask is None:
            return None
        import numpy as np
        from PIL import Image

        with Image.open(self.mask) as m:
            return np.asarray(m.convert("L")) > 0


@dataclass
class LoadResult:
    samples: list[Sample]
    skipped: int = 0
    skipped_reasons: list[tuple[int, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


# ----------------------------------------------------------------------------------------------
# Field validation. Each helper raises ValueError("field: what is wrong"); the loader adds the row.


def _is_number(v: Any) -> bool:
    # bool is an int subclass but "true" is never a coordinate.
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _coords(v: Any, n: int, what: str) -> list[float]:
    if not isinstance(v, (list, tuple)) or len(v) != n or not all(_is_number(x) for x in v):
        raise ValueError(f"{what} must be {n} numbers, got {v!r}")
    return [int(x) if float(x).is_integer() else float(x) for x in v]


def _box(v: Any, what: str) -> list[float]:
    b = _coords(v, 4, what)
    if b[0] > b[2] or b[1] > b[3]:
        raise ValueError(f"{what} must have x1<=x2 and y1<=y2, got {v!r}")
    return b


def validate_objects(value: Any) -> list[dict[str, list]]:
    """A grounding answer: a list (or its JSON text) of {"bbox_2d": 4 numbers, "point_2d": 2}."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"solution: not valid JSON ({e.msg})") from None
    if isinstance(value, dict):  # a lone object is a one-element answer
        value = [value]
    if not isinstance(value, list):
        raise ValueError(f"solution: must be a list of objects, got {type(value).__name__}")
    out = []
    for k, obj in enumerate(value):
        if not isinstance(obj, dict):
            raise ValueError(f"solution[{k}]: must be an object with bbox_2d and point_2d")
        if "bbox_2d" not in obj:
            raise ValueError(f"solution[{k}]: bbox_2d missing")
        if "point_2d" not in obj:
            raise ValueError(f"solution[{k}]: point_2d missing")
        out.append({"bbox_2d": _box(obj["bbox_2d"], "solution: bbox_2d"),
                    "point_2d": _coords(obj["point_2d"], 2, "solution: point_2d")})
    return out


def _validate_solution(task: str, value: Any) -> Any:
    if value is None:
        raise ValueError("solution: missing")
    if task == "grounding":
        return validate_objects(value)
    if task == "anomaly":
        # Either object boxes (possibly [] = normal image) or an image-level yes/no label.
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, str) and value.strip().lower() in ("yes", "no"):
            return value.strip().lower()
        return validate_objects(value)
    if task == "existence":  # is the named object in the image: an image-level yes/no
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, str) and value.strip().lower() in ("yes", "no"):
            return value.strip().lower()
        raise ValueError(f"solution: an existence answer is 'yes' or 'no', got {value!r}")
    if task == "gui":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"solution: not valid JSON ({e.msg})") from None
        if isinstance(value, (list, tuple)) and len(value) == 4 and all(_is_number(x) for x in value):
            return _box(value, "solution: bbox_2d")
        objs = validate_objects(value)
        if len(objs) != 1:
            raise ValueError(f"solution: a GUI target is one box, got {len(objs)} objects")
        return objs[0]["bbox_2d"]
    if task == "docvqa" and isinstance(value, (list, tuple)):
        # DocVQA lists every acceptable answer; ANLS takes the best.
        if not value or not all(isinstance(a, str) and a.strip() for a in value):
            raise ValueError("solution: must be non-empty answer strings")
        return [str(a) for a in value]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"solution: must be a string or a number, got {type(value).__name__}")
    text = str(value)
    if not text.strip():
        raise ValueError("solution: empty")
    return text


def _positive_int(v: Any, what: str) -> int | None:
    if v is None:
        return None
    if not _is_number(v) or int(v) != v or v <= 0:
        raise ValueError(f"{what}: must be a positive integer, got {v!r}")
    return int(v)


# ----------------------------------------------------------------------------------------------
# Images


def _check_image_file(path: str) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise ValueError(f"image: file not found: {path}")
    try:
        with Image.open(path) as im:
            size = im.size
            im.verify()  # reads the whole stream: catches truncation and bad CRCs, not only headers
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"image: cannot read {path}: {e}") from None
    return size


def _check_image_bytes(data: bytes, verify: bool = True) -> tuple[int, int, str]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            size, fmt = im.size, (im.format or "png").lower()
            if verify:
                im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"image: embedded bytes are not a readable image: {e}") from None
    return size[0], size[1], fmt


def _resolve(path: str, root: Path) -> str:
    p = Path(os.path.expanduser(path))
    return str(p if p.is_absolute() else (root / p))


def _image_field(value: Any, root: Path, check: bool, cache_dir: Path | None):
    """Returns (path or None, bytes or None, (w, h) or None)."""
    if value is None:
        return None, None, None
    if hasattr(value, "save") and hasattr(value, "size"):  # a decoded PIL image from `datasets`
        buf = io.BytesIO()
        value.save(buf, format=(getattr(value, "format", None) or "PNG"))
        value = buf.getvalue()
    if isinstance(value, dict):  # HF Image feature, decode=False / Parquet struct
        data, path = value.get("bytes"), value.get("path")
        if data is None:
            if not path:
                raise ValueError("image: neither bytes nor path")
            value = path
        else:
            value = bytes(data)
    if isinstance(value, (bytes, bytearray)):
        data = bytes(value)
        w, h, fmt = _check_image_bytes(data, verify=check)  # the header alone names the format
        size = (w, h)
        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)
            target = cache_dir / f"{hashlib.sha256(data).hexdigest()[:24]}.{fmt}"
            if not target.exists():
                tmp = target.with_suffix(target.suffix + f".tmp{os.getpid()}")
                tmp.write_bytes(data)
                os.replace(tmp, target)  # atomic: several ranks may cache the same dataset at once
            return str(target), None, size
        return None, data, size
    if isinstance(value, (str, os.PathLike)):
        if not str(value).strip():
            raise ValueError("image: empty path")
        path = _resolve(str(value), root)
        size = _check_image_file(path) if check else None
        return path, None, size
    raise ValueError(f"image: unsupported value of type {type(value).__name__}")


# ----------------------------------------------------------------------------------------------
# Row -> Sample


def _first(row: dict, *keys: str) -> Any:
    for k in keys:
        if k in row and row[k] is not None:
            return row[k]
    return None


def row_to_sample(row: dict, *, default_task: str | None, root: Path, check_images: bool = True,
                  image_cache_dir: Path | None = None, fallback_id: str = "") -> Sample:
    """Validate one raw row; raises ValueError("field: reason")."""
    if not isinstance(row, dict):
        raise ValueError(f"row must be an object, got {type(row).__name__}")
    task = row.get("task") or default_task or "grounding"
    if task not in TASKS:
        raise ValueError(f"task: unknown {task!r} (expected one of {', '.join(TASKS)})")
    rid = row.get("id", fallback_id)
    if rid is None or isinstance(rid, bool) or not isinstance(rid, (str, int)) or str(rid) == "":
        raise ValueError(f"id: must be a non-empty string or integer, got {rid!r}")
    problem = _first(row, "problem", "text", "question")
    if not isinstance(problem, str) or not problem.strip():
        raise ValueError("problem: missing or empty")
    solution = _validate_solution(task, _first(row, "solution", "answer"))
    choices = row.get("choices")
    if choices is not None:
        if isinstance(choices, str):
            try:
                choices = json.loads(choices)
            except json.JSONDecodeError:
                raise ValueError("choices: must be a list of strings") from None
        if not isinstance(choices, (list, tuple)) or not all(isinstance(c, (str, int, float)) for c in choices):
            raise ValueError("choices: must be a list of strings")
        choices = [str(c) for c in choices] or None
    width = _positive_int(row.get("img_width"), "img_width")
    height = _positive_int(row.get("img_height"), "img_height")

    image_path, image_bytes, size = _image_field(row.get("image"), root, check_images, image_cache_dir)
    if task in IMAGE_TASKS and image_path is None and image_bytes is None:
        raise ValueError(f"image: required for task {task}")
    if size is not None:
        # The stored image may be a resized copy; only fill what the row did not say.
        width = width or size[0]
        height = height or size[1]
    if (image_path or image_bytes) and (width is None or height is None):
        from PIL import Image

        src = io.BytesIO(image_bytes) if image_bytes is not None else image_path
        with Image.open(src) as im:
            width, height = width or im.size[0], height or im.size[1]

    mask = row.get("mask")
    if mask is not None:
        if not isinstance(mask, str) or not mask:
            raise ValueError("mask: must be a path")
        mask = _resolve(mask, root)
        if check_images:
            try:
                _check_image_file(mask)
            except ValueError as e:
                raise ValueError(str(e).replace("image:", "mask:", 1)) from None

    meta = {k: v for k, v in row.items() if k not in _KNOWN}
    return Sample(id=str(rid), task=task, image=image_path, problem=problem, solution=solution,
                  img_width=width, img_height=height, choices=choices, mask=mask,
                  image_bytes=image_bytes, meta=meta)


# ----------------------------------------------------------------------------------------------
# Readers: each yields (row_number, row dict or Exception for an unreadable row)


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, ValueError(f"not valid JSON ({e.msg})")


def _iter_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    n = 0
    # Batches keep memory bounded when the file embeds image bytes.
    for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
        for row in batch.to_pylist():
            n += 1
            yield n, row


def _iter_hf(ds) -> Iterator[tuple[int, Any]]:
    import datasets

    # decode=False hands back the stored {"bytes", "path"} instead of decoding every image.
    for name, feat in ds.features.items():
        if isinstance(feat, datasets.Image) and feat.decode:
            ds = ds.cast_column(name, datasets.Image(decode=False))
    for i, row in enumerate(ds, 1):
        yield i, row


def _open_hf_dir(path: Path, split: str | None):
    import datasets

    obj = datasets.load_from_disk(str(path))
    if isinstance(obj, datasets.DatasetDict):
        if split is None:
            if len(obj) != 1:
                raise ValueError(f"{path}: a DatasetDict with splits {sorted(obj)}; pass split=")
            split = next(iter(obj))
        if split not in obj:
            raise ValueError(f"{path}: no split {split!r} (have {sorted(obj)})")
        obj = obj[split]
    return obj


def iter_dataset_rows(path, *, split: str | None = None, image_root=None) -> tuple[Iterator[tuple[int, Any]], Path]:
    """(numbered rows, image root) of a JSONL / Parquet file, a ``save_to_disk`` directory or an
    in-memory ``datasets.Dataset``; relative image paths resolve against the root."""
    if hasattr(path, "features") and hasattr(path, "cast_column"):
        return _iter_hf(path), Path(image_root or os.getcwd())
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        raise FileNotFoundError(f"dataset not found: {p}")
    if p.is_dir():
        rows, root = _iter_hf(_open_hf_dir(p, split)), p
    elif p.suffix == ".parquet":
        rows, root = _iter_parquet(p), p.parent
    elif p.suffix in (".jsonl", ".json"):
        rows, root = _iter_jsonl(p), p.parent
    else:
        raise ValueError(f"{p}: unknown dataset format (expected .jsonl, .parquet or a save_to_disk directory)")
    return rows, (Path(image_root) if image_root is not None else root)


def load_samples(path, *, task: str | None = None, on_bad_row: str = "error",
                 image_root: str | os.PathLike | None = None, split: str | None = None,
                 check_images: bool = True, image_cache_dir: str | os.PathLike | None = None,
                 limit: int | None = None) -> LoadResult:
    """Load and validate samples.

    ``path``: a ``.jsonl``/``.json`` file, a ``.parquet`` file, a ``save_to_disk`` directory, or an
    in-memory ``datasets.Dataset``. ``task`` is the default for rows without a ``task`` column.
    Relative image/mask paths resolve against ``image_root``, else the file's directory (the
    directory itself for ``save_to_disk``). ``check_images`` opens and verifies every image.
    """
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    if task is not None and task not in TASKS:
        raise ValueError(f"task: unknown {task!r} (expected one of {', '.join(TASKS)})")
    cache = Path(image_cache_dir) if image_cache_dir is not None else None

    rows, root = iter_dataset_rows(path, split=split, image_root=image_root)

    result = LoadResult(samples=[])
    seen: dict[str, int] = {}
    for rowno, row in rows:
        if limit is not None and len(result.samples) >= limit:
            break
        try:
            if isinstance(row, Exception):
                raise row
            s = row_to_sample(row, default_task=task, root=root, check_images=check_images,
                              image_cache_dir=cache, fallback_id=str(rowno))
            if s.id in seen:
                raise ValueError(f"id: {s.id!r} duplicates row {seen[s.id]}")
            seen[s.id] = rowno
        except ValueError as e:
            if on_bad_row == "error":
                raise DataValidationError(rowno, str(e)) from None
            result.skipped += 1
            result.skipped_reasons.append((rowno, str(e)))
            continue
        result.samples.append(s)
    return result


def sample_to_row(sample: Sample, *, relative_to: Path | None = None) -> dict[str, Any]:
    """The JSONL row for a sample; key order is fixed so that files are byte-reproducible."""

    base = relative_to.resolve() if relative_to is not None else None

    def rel(p: str | None) -> str | None:
        if p is None or base is None:
            return p
        full = Path(p).resolve()
        # Only paths inside the dataset directory become relative: "../" paths break on a move.
        return full.relative_to(base).as_posix() if full.is_relative_to(base) else p

    row: dict[str, Any] = {"id": sample.id, "task": sample.task, "problem": sample.problem,
                           "solution": sample.solution, "image": rel(sample.image),
                           "img_height": sample.img_height, "img_width": sample.img_width}
    if sample.mask is not None:
        row["mask"] = rel(sample.mask)
    if sample.choices is not None:
        row["choices"] = list(sample.choices)
    for k, v in sample.meta.items():
        row.setdefault(k, v)
    return row


def save_samples_jsonl(samples: Iterable[Sample], path, *, image_dir=None) -> Path:
    """Write samples as JSONL. Paths under the file's directory are stored relative to it, so the
    dataset directory can be moved. Samples that only hold image bytes get them written to
    ``image_dir`` (default ``<stem>_images`` next to the file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.parent
    img_dir = Path(image_dir) if image_dir is not None else base / f"{path.stem}_images"
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for s in samples:
            if s.image is None and s.image_bytes is not None:
                _, _, fmt = _check_image_bytes(s.image_bytes)
                img_dir.mkdir(parents=True, exist_ok=True)
                target = img_dir / f"{hashlib.sha256(s.image_bytes).hexdigest()[:24]}.{fmt}"
                if not target.exists():
                    target.write_bytes(s.image_bytes)
                s = Sample(**{**s.__dict__, "image": str(target), "image_bytes": None})
            f.write(json.dumps(sample_to_row(s, relative_to=base), ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def split_counts(samples: Sequence[Sample]) -> dict[str, int]:
    """Number of samples per task (for logging what a mixed dataset holds)."""
    out: dict[str, int] = {}
    for s in samples:
        out[s.task] = out.get(s.task, 0) + 1
    return out
