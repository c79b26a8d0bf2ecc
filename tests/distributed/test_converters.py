"""checkpoint_converters: HF -> Megatron dist checkpoint -> HF, bit-exact, any layout; bad inputs."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.qwen_fixtures import build_batch, build_checkpoint, hf_reference_logits
from visurf_megatron.checkpoint.convert import ConversionError, launch
from visurf_megatron.checkpoint.mapping import inmemory_name
from visurf_megatron.checkpoint.safetensors_io import open_hf_checkpoint

REPO = Path(__file__).resolve().parents[2]


def to_megatron(hf, out, tp, pp, **kw):
    return launch("hf_to_megatron", tp * pp, dict(hf_dir=str(hf), out_dir=str(out), tp=tp, pp=pp, progress=False, **kw))


def to_hf(meg, out, tp=1, pp=1, **kw):
    return launch("megatron_to_hf", tp * pp, dict(megatron_dir=str(meg), out_dir=str(out), tp=tp, pp=pp, progress=False, **kw))


def read_all(directory):
    with open_hf_checkpoint(directory) as reader:
        return {k: reader[k] for k in reader.keys()}


def assert_bit_identical(a_dir, b_dir):
    a, b = read_all(a_dir), read_all(b_dir)
    assert sorted(a) == sorted(b)
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert different == [], f"tensors differ: {different[:5]}"


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("conv")
    untied = build_checkpoint(root, "untied")
    # The same checkpoint saved in the newer in-memory naming (model.language_model.*, model.visual.*).
    renamed = root / "tiny_inmemory"
    renamed.mkdir()
    for f in untied.iterdir():
        if f.name != "model.safetensors":
            (renamed / f.name).write_bytes(f.read_bytes())
    save_file({inmemory_name(k): v for k, v in load_file(untied / "model.safetensors").items()},
              str(renamed / "model.safetensors"), metadata={"format": "pt"})
    return {"untied": untied, "tied": build_checkpoint(root, "tied"), "inmemory": renamed, "root": root,
            # the other family, converted by its model_type with no flag
            "qwen2_vl:untied": build_checkpoint(root, "untied", family="qwen2_vl"),
            "qwen2_vl:tied": build_checkpoint(root, "tied", family="qwen2_vl")}


@pytest.mark.parametrize("kind", ["untied", "inmemory", "tied", "qwen2_vl:untied", "qwen2_vl:tied"])
def test_round_trip_tp2_pp2_is_bit_identical(hf_dirs, tmp_path, kind):
    meg, back = tmp_path / "meg", tmp_path / "back"
    to_megatron(hf_dirs[kind], meg, tp=2, pp=2)
    info = to_hf(meg, back, max_shard_size="200KB")
    assert len(info["files"]) > 1 and (back / "model.safetensors.index.json").is_file()
    assert_bit_identical(hf_dirs["untied" if kind == "inmemory" else kind], back)
    # Hub naming in the output whatever the input naming; tied checkpoints keep lm_head out.
    keys = read_all(back).keys()
    assert all(k.startswith(("model.layers.", "model.embed_tokens", "model.norm", "visual.", "lm_head")) for k in keys)
    assert ("lm_head.weight" in keys) == (kind.rpartition(":")[2] != "tied")
    family = kind.split(":")[0] if ":" in kind else "qwen2_5_vl"
    assert json.loads((back / "config.json").read_text())["model_type"] == family


def test_tp2_checkpoint_reloads_as_pp2_and_matches_transformers(hf_dirs, tmp_path):
    hf = hf_dirs["untied"]
    meg, back = tmp_path / "meg", tmp_path / "back"
    to_megatron(hf, meg, tp=2, pp=1)
    to_hf(meg, back, tp=1, pp=2)
    assert_bit_identical(hf, back)
    batch = build_batch(hf)
    original, converted = hf_reference_logits(hf, batch), hf_reference_logits(back, batch)
    assert torch.equal(original, converted)
    assert json.loads((back / "config.json").read_text())["model_type"] == "qwen2_5_vl"
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "generation_config.json"):
        assert (back / name).is_file(), name


def test_bad_inputs_are_refused_with_clear_errors(hf_dirs, tmp_path):
    hf = hf_dirs["untied"]
    # TP that does not divide the query groups (4 heads, 2 KV heads).
    with pytest.raises(ConversionError, match="does not divide the 2 query groups"):
        to_megatron(hf, tmp_path / "tp4", tp=4, pp=1)
    assert not (tmp_path / "tp4").exists()
    # A missing tensor is named.
    broken = tmp_path / "missing"
    broken.mkdir()
    for f in hf.iterdir():
        if f.name != "model.safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    tensors = load_file(hf / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        to_megatron(broken, tmp_path / "out_missing", tp=1, pp=1)
    # An unexpected extra tensor is named too.
    tensors = load_file(hf / "model.safetensors")
    tensors["model.layers.0.extra_adapter.weight"] = torch.zeros(2)
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(ConversionError, match="extra_adapter"):
        to_megatron(broken, tmp_path / "out_extra", tp=1, pp=1)
    # A truncated safetensors file.
    data = (hf / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="model.safetensors"):
        to_megatron(broken, tmp_path / "out_trunc", tp=1, pp=1)
    # An existing output directory needs --overwrite.
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="exists; pass --overwrite"):
        to_megatron(hf, existing, tp=1, pp=1)
    assert (existing / "keep.txt").read_text() == "mine"
    for name in ("tp4", "out_missing", "out_extra", "out_trunc"):
        assert not (tmp_path / name).exists() and not (tmp_path / f".{name}.partial").exists()


def test_interrupted_conversion_leaves_no_output(hf_dirs, tmp_path):
    out = tmp_path / "meg"
    partial = tmp_path / ".meg.partial"
    cmd = [sys.executable, str(REPO / "checkpoint_converters" / "hf_to_megatron.py"), "--hf-dir", str(hf_dirs["untied"]),
           "--out-dir", str(out), "--tp", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not partial.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert partial.exists(), "the conversion never reached its writing phase"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    time.sleep(2)  # ranks die with their parent (PR_SET_PDEATHSIG); give them a moment
    assert not out.exists()
    # A rerun cleans the stale partial directory and succeeds.
    to_megatron(hf_dirs["untied"], out, tp=1, pp=1)
    assert out.exists() and not partial.exists()
    # And the CLI prints a clear error, exit code 1, for an existing output.
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "exists; pass --overwrite" in res.stderr
    helped = subprocess.run([sys.executable, str(REPO / "checkpoint_converters" / "megatron_to_hf.py"), "--help"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "--max-shard-size" in helped.stdout


def test_unreadable_megatron_shard_fails_on_every_rank_without_output(hf_dirs, tmp_path):
    # Ranks read their parameters while streaming to rank 0: a read failure on one rank must not
    # leave the others waiting in a send or receive, and nothing may be published.
    meg, back = tmp_path / "meg", tmp_path / "back"
    to_megatron(hf_dirs["untied"], meg, tp=2, pp=1)
    shard = sorted(meg.glob("__1_*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    with pytest.raises(ConversionError, match=r"cannot read .*EOFError"):
        to_hf(meg, back, tp=2, pp=1)
    assert not back.exists()


def test_streamed_hf_save_holds_little_memory_and_reloads_bit_exactly(hf_dirs, tmp_path):
    """HF -> Megatron reads each parameter as the save asks for it, into recycled memory."""
    from tests.distributed.qwen_world import streamed_save_world
    from visurf_megatron.runtime.spawn import run_world

    (tmp_path / "meg").mkdir()
    for rank, result in enumerate(run_world(streamed_save_world, 2, str(hf_dirs["untied"]), str(tmp_path / "meg"), 2,
                                            timeout_s=600)):
        assert result["different"] == [], f"rank {rank}: reloaded parameters differ from HF"
        # In flight: one parameter and one part of it; pooled: at most one parameter's size.
        assert result["peak"] <= 3 * result["largest"] < result["total"], result
        if rank == 0:
            assert result["unread"] == [], "TP rank 0 saves every parameter, so it must read every one"
        else:
            assert result["unread"] and all(replicated for _, replicated in result["unread"]), result["unread"]
