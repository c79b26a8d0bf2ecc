"""Training checkpoints: exact resume in a new world (TP2, DP2 distributed optimizer, PP2 plain
optimizer), atomic save (partial dirs ignored, ``latest`` always complete, pruning), HF export."""
import shutil
import time

import pytest
import torch

from tests.distributed import ckpt_world
from tests.qwen_fixtures import build_batch, build_checkpoint
from visurf_megatron.checkpoint.convert import launch
from visurf_megatron.checkpoint.megatron_io import LATEST_NAME, META_NAME, read_meta
from visurf_megatron.checkpoint.safetensors_io import open_hf_checkpoint
from visurf_megatron.runtime.spawn import run_world
from visurf_megatron.training.checkpointing import complete_iterations, latest_checkpoint

N = 2  # save at step N, compare steps N+1..2N
SCENARIOS = [
    # TP2 with the distributed optimizer (DP1); also saves at step 1, pruned by keep_last=1.
    dict(name="tp2_distopt", tp=2, pp=1, dist_opt=True, save_at=(1, N), keep_last=1, gather_hf=True),
    # DP2: the distributed optimizer really shards the Adam state over two ranks.
    dict(name="dp2_distopt", tp=1, pp=1, dist_opt=True, save_at=(N,)),
    # PP2 with the plain (non-distributed) fp32 optimizer.
    dict(name="pp2_fp32opt", tp=1, pp=2, dist_opt=False, save_at=(N,), save_again=True, gather_hf=True),
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_ckpt")
    hf = build_checkpoint(root, "untied")
    batch = build_batch(hf)
    scenarios = [dict(sc, root=str(root / sc["name"])) for sc in SCENARIOS]
    t0 = time.monotonic()
    straight = run_world(ckpt_world.straight_world, 2, str(hf), batch, scenarios, N, timeout_s=300)
    t1 = time.monotonic()
    listing = {sc["name"]: (sorted(p.name for p in (root / sc["name"]).iterdir()),
                            (root / sc["name"] / LATEST_NAME).read_text().strip()) for sc in scenarios}
    # A save killed mid-way leaves a hidden partial directory of junk; loading must ignore it, and
    # the next save (of any step, including this very one) must clean it up.
    for sc in scenarios:
        for junk_step in (N + 1, 2 * N):
            junk = root / sc["name"] / f".iter_{junk_step:07d}.partial"
            junk.mkdir()
            (junk / "metadata.json").write_text("{not json")
            (junk / "__0_0.distcp").write_bytes(b"\0garbage")
    resumed = run_world(ckpt_world.resume_world, 2, str(hf), batch, scenarios, N, str(root / "empty"),
                        str(root / "pp2_fp32opt"), str(root / "tp2_distopt"), timeout_s=300)
    t2 = time.monotonic()
    saves = {k: [round(t, 2) for t in v["save_s"]] for k, v in straight[0].items()}
    loads = {sc["name"]: round(resumed[0][sc["name"]]["load_s"], 2) for sc in scenarios}
    print(f"\nstraight world {t1 - t0:.1f}s (saves {saves}), resumed world {t2 - t1:.1f}s (loads {loads})")
    return dict(root=root, hf=hf, scenarios=scenarios, straight=straight, resumed=resumed, listing=listing)


@pytest.mark.parametrize("name", [sc["name"] for sc in SCENARIOS])
def test_resume_is_bit_identical(runs, name):
    for rank in (0, 1):
        straight = runs["straight"][rank][name]["records"]
        resumed = runs["resumed"][rank][name]
        assert resumed["train_state"]["step"] == N
        assert resumed["train_state"]["grad_norms"] == [r["grad_norm"] for r in straight[:N]]  # as saved
        assert resumed["fresh"] != resumed["loaded"]  # the load really replaced the HF weights
        assert resumed["loaded"] == straight[N - 1]["params"]
        assert len(resumed["records"]) == N
        for step, (a, b) in enumerate(zip(straight[N:], resumed["records"]), start=N + 1):
            assert a == b, f"rank {rank} step {step}: straight {a} != resumed {b}"
        # The run moved: losses change step to step, and the RNG-dependent weights differ.
        losses = [r["loss"] for r in straight if r["loss"] is not None]
        assert len(set(losses)) == len(losses)
    # Losses exist on the last pipeline stage only.
    has_loss = [runs["straight"][r][name]["records"][0]["loss"] is not None for r in (0, 1)]
    assert has_loss == ([False, True] if name.startswith("pp2") else [True, True])


def test_atomic_layout_latest_and_pruning(runs):
    root = runs["root"]
    names, latest = runs["listing"]["tp2_distopt"]
    # Saved at 1 and N with keep_last=1: iter 1 pruned; no partial left; latest names the newest.
    assert names == [f"iter_{N:07d}", LATEST_NAME]
    assert latest == str(N)
    for sc in runs["scenarios"]:
        directory = latest_checkpoint(sc["root"])
        assert (directory / "metadata.json").is_file() and (directory / META_NAME).is_file()
        assert (directory / "common.pt").is_file()
        meta = read_meta(directory)
        assert meta["kind"] == "training" and meta["saved_layout"] == {"tp": sc["tp"], "pp": sc["pp"]}
        assert (directory / "hf_assets" / "tokenizer.json").is_file()
    # The PP2 run saved again at 2N after loading: its stale partials are gone, 2 iterations kept.
    pp2 = root / "pp2_fp32opt"
    assert sorted(p.name for p in pp2.iterdir()) == [f"iter_{N:07d}", f"iter_{2 * N:07d}", LATEST_NAME]
    assert complete_iterations(pp2) == [N, 2 * N]
    assert (pp2 / LATEST_NAME).read_text().strip() == str(2 * N)
    # The other roots still hold the junk partials (no save ran there after the crash) and loaded fine.
    assert (root / "dp2_distopt" / f".iter_{N + 1:07d}.partial").is_dir()
    assert runs["resumed"][0]["empty"] is None and runs["resumed"][1]["empty"] is None


def test_latest_falls_back_to_a_complete_checkpoint(runs, tmp_path):
    """No ``latest``: no checkpoint. ``latest`` naming a missing or incomplete directory (killed while a
    same-step checkpoint was replaced): the newest complete one, never a partial or incomplete one."""
    src = latest_checkpoint(runs["root"] / "tp2_distopt")
    shutil.copytree(src, tmp_path / src.name)
    assert latest_checkpoint(tmp_path) is None
    incomplete = tmp_path / "iter_0000009"
    incomplete.mkdir()
    (incomplete / META_NAME).write_text("{}")  # no metadata.json: megatron never finished it
    (tmp_path / ".iter_0000010.partial").mkdir()
    (tmp_path / LATEST_NAME).write_text("10\n")
    assert complete_iterations(tmp_path) == [N]
    assert latest_checkpoint(tmp_path) == tmp_path / src.name
    shutil.rmtree(tmp_path / src.name)
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        latest_checkpoint(tmp_path)


def test_layout_changes(runs):
    """Plain optimizer: a PP2 checkpoint reloads under TP2 (model and Adam state are keyed by model
    tensors). Distributed optimizer (``dp_reshardable``): another TP/PP is refused with a clear error."""
    reshard = runs["resumed"][0]["reshard"]
    assert reshard["step"] == N
    expected = runs["straight"][0]["pp2_fp32opt"]["hf"]
    assert sorted(reshard["hf"]) == sorted(expected)
    assert [k for k in expected if not torch.equal(reshard["hf"][k], expected[k])] == []
    assert torch.isfinite(torch.tensor(reshard["next"]["loss"]))
    for rank in (0, 1):
        refused = runs["resumed"][rank]["refused"]
        assert refused is not None and "reloads only under the same TP/PP" in refused and "TP2 PP1" in refused


def test_training_checkpoint_converts_to_hf(runs, tmp_path):
    root = runs["root"] / "tp2_distopt"
    out = tmp_path / "hf_out"
    launch("megatron_to_hf", 1, dict(megatron_dir=str(root), out_dir=str(out), tp=1, pp=1, progress=False))
    expected = runs["straight"][0]["tp2_distopt"]["hf"]
    with open_hf_checkpoint(out) as reader:
        exported = {k: reader[k] for k in reader.keys()}
    assert sorted(exported) == sorted(expected)
    different = [k for k in expected if not torch.equal(exported[k], expected[k])]
    assert different == []
    with open_hf_checkpoint(runs["hf"]) as reader:  # and it is the trained model, not the initial one
        name = "model.layers.0.mlp.up_proj.weight"
        assert not torch.equal(reader[name], exported[name])
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()

