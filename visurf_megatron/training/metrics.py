"""Step metrics: (sum, count) accumulation on the ranks that own each quantity, one reduction, then
TensorBoard + ``metrics.jsonl`` on global rank 0."""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Optional

import torch.distributed as dist


class MetricSums:
    """Per-rank partial sums; ``reduce()`` combines them over the world (mean = sum / count)."""

    def __init__(self):
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, float] = defaultdict(float)
        self.values: dict[str, float] = {}

    def add(self, key: str, value: float, count: float = 1.0) -> None:
        """``value`` is a sum over ``count`` items (add(key, x) for a single item)."""
        self.sums[key] += float(value)
        self.counts[key] += float(count)

    def set(self, key: str, value: float) -> None:
        """A value every owning rank agrees on (e.g. the grad norm); the first one wins."""
        self.values[key] = float(value)

    def reduce(self) -> dict[str, float]:
        local = {"sums": dict(self.sums), "counts": dict(self.counts), "values": self.values}
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        sums, counts, values = defaultdict(float), defaultdict(float), {}
        for part in gathered:
            for k, v in part["sums"].items():
                sums[k] += v
            for k, v in part["counts"].items():
                counts[k] += v
            for k, v in part["values"].items():
                values.setdefault(k, v)
        out = {k: (sums[k] / counts[k] if counts[k] else math.nan) for k in sums}
        out.update(values)
        return dict(sorted(out.items()))


def truncate_jsonl(path: Path, keep_through_step: Optional[int]) -> None:
    """Keep the records of steps <= ``keep_through_step`` (all of them if None); drop cut lines.

    Records are numbered by completed steps, so after resuming from the step-k checkpoint the
    next record is k+1 and nothing is logged twice.
    """
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            step = json.loads(line).get("step", 0)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if keep_through_step is None or step <= keep_through_step:
            keep.append(line)
    path.write_text("".join(line + "\n" for line in keep))


class MetricsLogger:
    """Writes on global rank 0 only; on resume, drops JSONL lines (and samples) of steps about to be redone."""

    def __init__(self, directory: str | Path, *, tensorboard: bool = True, jsonl: bool = True,
                 resume_from_step: Optional[int] = None):
        self.enabled = dist.get_rank() == 0
        self.directory = Path(directory)
        self.jsonl_path = self.directory / "metrics.jsonl"
        self.writer = None
        self.jsonl = jsonl
        if not self.enabled:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        if jsonl:
            for path in (self.jsonl_path, self.directory / "samples.jsonl"):
                truncate_jsonl(path, resume_from_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_from_step is None else resume_from_step + 1
            self.writer = SummaryWriter(str(self.directory / "tensorboard"), purge_step=purge)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.jsonl:
            record = {"step": step, **{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}}
            with self.jsonl_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not math.isnan(value):
                    self.writer.add_scalar(key, value, step)
            self.writer.flush()

    def log_samples(self, step: int, samples: list[dict]) -> None:
        """A few responses of the step (first group), to read what the policy writes."""
        if not self.enabled or not self.jsonl:
            return
        with (self.directory / "samples.jsonl").open("a") as f:
            for sample in samples:
                f.write(json.dumps({"step": step, **sample}) + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
