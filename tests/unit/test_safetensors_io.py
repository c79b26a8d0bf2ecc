"""checkpoint/safetensors_io.py and hf_writer.py against the real ``safetensors`` library.

Reads are compared with what ``safetensors`` itself reads from files it wrote; files we write are
read back with ``safetensors`` (the reference), never with our own reader alone.
"""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from visurf_megatron.checkpoint.hf_writer import ShardedSafetensorsWriter, ShardPlan, SlotWriter
from visurf_megatron.checkpoint.safetensors_io import CheckpointError, open_hf_checkpoint


@pytest.fixture
def saved(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "tall": torch.randn(1500, 7, generator=gen).to(torch.bfloat16),  # > one preadv of rows
        "wide": torch.randn(5, 64, generator=gen),
        "vec": torch.arange(10, dtype=torch.int64),
        "conv": torch.randn(4, 3, 2, 2, generator=gen).to(torch.float16),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path, tensors


@pytest.mark.parametrize("name,start,stop", [("tall", 0, 7), ("tall", 3, 4), ("tall", 2, 6), ("wide", 32, 64),
                                             ("wide", 0, 1), ("wide", 10, 10)])
def test_column_ranges_read_in_place_equal_safetensors(saved, name, start, stop):
    directory, tensors = saved
    with open_hf_checkpoint(directory) as reader, safe_open(directory / "model.safetensors", "pt") as ref:
        lazy = reader.get_slice(name)
        out = torch.full((lazy.shape[0], stop - start), 7, dtype=lazy.dtype)
        assert lazy.read_columns_into(out, start, stop) is out
        assert torch.equal(out, ref.get_slice(name)[:, start:stop])
        assert torch.equal(out, tensors[name][:, start:stop])


def test_rows_and_whole_tensors_equal_safetensors(saved):
    directory, tensors = saved
    with open_hf_checkpoint(directory) as reader:
        for name, tensor in tensors.items():
            assert torch.equal(reader[name], tensor)
        out = torch.empty(5, 7, dtype=torch.bfloat16)
        assert torch.equal(reader.get_slice("tall").read_rows_into(out, 100, 105), tensors["tall"][100:105])
        assert torch.equal(reader.get_slice("tall")[:, 1:3], tensors["tall"][:, 1:3])


def test_bad_column_reads_are_refused(saved):
    directory, _ = saved
    with open_hf_checkpoint(directory) as reader:
        with pytest.raises(ValueError, match="columns 0:8"):
            reader.get_slice("wide").read_columns_into(torch.empty(5, 8, dtype=torch.bfloat16), 0, 8)
        with pytest.raises(ValueError, match="columns 60:68"):
            reader.get_slice("wide").read_columns_into(torch.empty(5, 8), 60, 68)


def test_truncated_file_is_named(saved):
    directory, _ = saved
    path = directory / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        open_hf_checkpoint(directory).get_slice("tall")


def _entries(tensors):
    return [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]


@pytest.mark.parametrize("max_shard", [10**9, 20_000, 1])
def test_planned_files_written_by_parts_equal_the_buffered_writer_byte_for_byte(saved, tmp_path, max_shard):
    """Two writers, one format: parts written in any order by SlotWriter give the buffered writer's files."""
    _, tensors = saved
    buffered, planned = tmp_path / "buffered", tmp_path / "planned"
    buffered.mkdir()
    planned.mkdir()
    writer = ShardedSafetensorsWriter(buffered, max_shard)
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    names = writer.close()

    plan = ShardPlan.build(_entries(tensors), max_shard)
    plan.create_files(planned)
    slots = SlotWriter(planned, plan)
    # Columns of "tall" in two halves (one write per row), "wide" by row blocks in reverse, the rest whole.
    tall = tensors["tall"]
    slots.write("tall", 0, 4, tall[:, 4:])
    slots.write("tall", 0, 0, tall[:, :4])
    for start in (4, 2, 0):
        slots.write("wide", start, 0, tensors["wide"][start:start + 2])
    slots.write("vec", 0, 0, tensors["vec"].reshape(-1, 1))
    slots.write("conv", 0, 0, tensors["conv"].reshape(4, -1))
    slots.close()
    assert plan.write_index(planned) == names
    assert slots.bytes_written == plan.total_bytes == writer.total_bytes
    for name in names + (["model.safetensors.index.json"] if len(names) > 1 else []):
        assert (planned / name).read_bytes() == (buffered / name).read_bytes(), name
    for name in names:
        with safe_open(planned / name, "pt") as f:
            for key in f.keys():
                assert torch.equal(f.get_tensor(key), tensors[key])
    if len(names) > 1:
        assert set(json.loads((planned / "model.safetensors.index.json").read_text())["weight_map"]) == set(tensors)


def test_slot_writer_casts_and_refuses_blocks_that_do_not_fit(tmp_path):
    plan = ShardPlan.build([("w", (3, 4), torch.float32)], 10**9, dtype=torch.bfloat16)
    plan.create_files(tmp_path)
    writer = SlotWriter(tmp_path, plan)
    with pytest.raises(ValueError, match="does not fit"):
        writer.write("w", 2, 0, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="does not fit"):
        writer.write("w", 0, 1, torch.zeros(3, 4))
    w = torch.randn(3, 4)
    writer.write("w", 0, 0, w)
    writer.close()
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert torch.equal(f.get_tensor("w"), w.to(torch.bfloat16))


# --------------------------------------------------------------------------------------------
# Drop-behind: written pages leave the page cache, data stays intact


def _resident_pages(path) -> list[bool]:
    """Which pages of ``path`` are in the page cache (Linux ``mincore`` on a mapping that reads nothing)."""
    import ctypes
    import mmap
    import os

    size = os.path.getsize(path)
    pages = -(-size // mmap.PAGESIZE)
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), size) as mapped:
        address = ctypes.addressof(ctypes.c_char.from_buffer(mapped))
        vec = (ctypes.c_ubyte * pages)()
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        assert libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), vec) == 0, ctypes.get_errno()
        del address  # the buffer export must end before the mapping closes
        return [bool(v & 1) for v in vec]


@pytest.mark.skipif(not hasattr(__import__("os"), "posix_fadvise"), reason="needs posix_fadvise (Linux)")
def test_drop_behind_drops_the_whole_pages_it_was_told_about_and_keeps_partial_ones(tmp_path):
    """The kernel drops whole cached folios (one page or more) inside the range; the partial pages
    at both ends, which another rank may still write, must stay."""
    import os

    from visurf_megatron.checkpoint.safetensors_io import DropBehind

    size = 16 << 20
    content = os.urandom(size)
    path = tmp_path / "f.bin"
    path.write_bytes(content)
    fd = os.open(path, os.O_RDWR)
    try:
        drop = DropBehind(every=1 << 30)
        drop.wrote(fd, 100, size - 200)  # all but 100 bytes at each end: the first and last page are partial
        os.fsync(fd)  # only pages already written back can be dropped
        assert all(_resident_pages(path))
        drop.flush()
    finally:
        os.close(fd)
    resident = _resident_pages(path)
    assert resident[0] and resident[-1], "a partially written page was dropped"
    assert resident.count(False) >= len(resident) // 2, f"only {resident.count(False)} of {len(resident)} dropped"
    assert path.read_bytes() == content


def test_drop_behind_stream_writes_what_torch_save_reads_back(tmp_path):
    import io

    from visurf_megatron.checkpoint.safetensors_io import DropBehindStream

    tensors = [torch.randn(300, 70) for _ in range(4)]
    with DropBehindStream(open(tmp_path / "t.pt", "wb"), every=50_000) as stream:
        offsets = []
        for t in tensors:
            offsets.append(stream.tell())
            torch.save(t, stream)
    data = (tmp_path / "t.pt").read_bytes()
    bounds = offsets + [len(data)]
    for t, (a, b) in zip(tensors, zip(bounds, bounds[1:])):
        assert torch.equal(torch.load(io.BytesIO(data[a:b]), weights_only=True), t)
