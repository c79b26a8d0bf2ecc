"""checkpoint/mapping.py: the HF <-> Megatron transforms on hand-made tensors, and the table's coverage.

Every tensor is built so that each element says where it came from (100+i for q, 200+i for k, ...),
and every expected layout is written out by hand, not recomputed with the code under test.
"""
import json

import pytest
import torch
from safetensors import safe_open

from tests.qwen_fixtures import build_checkpoint
from visurf_megatron.checkpoint.mapping import MAPPINGS, QWEN25_VL_MAPPING, hub_name, inmemory_name, lookup
from visurf_megatron.checkpoint.transforms import (
    GatedMLP,
    GroupedQKV,
    MappingContext,
    Replicated,
    Split,
    VocabSplit,
    as_matrix,
    interleave_qkv,
    split_qkv,
)

T = torch.tensor

# Language: H=4 heads, G=2 query groups, head_dim d=2. Vision: 2 heads of d=2. Vocab 5 padded to 8.
CTX = MappingContext(vocab_size=5, padded_vocab_size=8, num_attention_heads=4, num_query_groups=2, head_dim=2,
                     vision_num_heads=2, vision_head_dim=2, tie_word_embeddings=False)


def _rows(base: int, n: int, hidden: int = 3) -> torch.Tensor:
    """[n, hidden] with element (r, c) = base + 10*r + c: every row identifiable."""
    return base + 10 * torch.arange(n).view(n, 1) + torch.arange(hidden).view(1, hidden)


# --------------------------------------------------------------------------------------------
# QKV


def test_interleave_qkv_bias_is_per_group_q_then_k_then_v():
    q = T([100, 101, 102, 103, 104, 105, 106, 107])  # 4 heads x d=2
    k = T([200, 201, 202, 203])  # 2 groups x d=2
    v = T([300, 301, 302, 303])
    fused = interleave_qkv(q, k, v, groups=2, head_dim=2)
    assert fused.tolist() == [100, 101, 102, 103, 200, 201, 300, 301,   # group 0: heads 0,1; k0; v0
                              104, 105, 106, 107, 202, 203, 302, 303]   # group 1: heads 2,3; k1; v1
    assert [t.tolist() for t in split_qkv(fused, groups=2, heads=4, head_dim=2)] == [q.tolist(), k.tolist(), v.tolist()]


def test_interleave_qkv_weight_rows_by_hand():
    q, k, v = _rows(1000, 8), _rows(2000, 4), _rows(3000, 4)  # hidden = 3
    fused = interleave_qkv(q, k, v, groups=2, head_dim=2)
    expected = torch.stack([q[0], q[1], q[2], q[3], k[0], k[1], v[0], v[1],
                            q[4], q[5], q[6], q[7], k[2], k[3], v[2], v[3]])
    assert fused.shape == (16, 3)
    assert torch.equal(fused, expected)
    assert fused[4].tolist() == [2000, 2001, 2002]  # first k row follows the 4 q rows of group 0
    q2, k2, v2 = split_qkv(fused, groups=2, heads=4, head_dim=2)
    assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v)


def test_split_qkv_inverts_interleave_for_mha_and_single_group():
    for heads, groups in [(4, 4), (4, 1), (6, 3)]:
        q, k, v = _rows(1000, heads * 2, 5), _rows(2000, groups * 2, 5), _rows(3000, groups * 2, 5)
        out = split_qkv(interleave_qkv(q, k, v, groups, 2), groups, heads, 2)
        assert all(torch.equal(a, b) for a, b in zip(out, (q, k, v))), (heads, groups)


def test_grouped_qkv_language_tp2_rank_holds_its_query_group():
    q, k, v = _rows(1000, 8), _rows(2000, 4), _rows(3000, 4)
    t = GroupedQKV("language")
    shards = [t.to_megatron([q, k, v], rank, 2, CTX) for rank in range(2)]
    assert torch.equal(shards[0], torch.stack([q[0], q[1], q[2], q[3], k[0], k[1], v[0], v[1]]))
    assert torch.equal(shards[1], torch.stack([q[4], q[5], q[6], q[7], k[2], k[3], v[2], v[3]]))
    back = t.to_hf(shards, CTX)
    assert len(back) == 3 and all(torch.equal(a, b) for a, b in zip(back, (q, k, v)))
    # TP1 holds both groups; biases follow the same path.
    qb, kb, vb = T([100, 101, 102, 103, 104, 105, 106, 107]), T([200, 201, 202, 203]), T([300, 301, 302, 303])
    assert t.to_megatron([qb, kb, vb], 0, 1, CTX).tolist() == [100, 101, 102, 103, 200, 201, 300, 301,
                                                               104, 105, 106, 107, 202, 203, 302, 303]
    assert t.to_megatron([qb, kb, vb], 1, 2, CTX).tolist() == [104, 105, 106, 107, 202, 203, 302, 303]


def test_grouped_qkv_rejects_wrong_geometry():
    q, k, v = _rows(1000, 8), _rows(2000, 6), _rows(3000, 6)  # 3 kv groups, context says 2
    with pytest.raises(ValueError, match="groups"):
        GroupedQKV("language").to_megatron([q, k, v], 0, 1, CTX)


def test_grouped_qkv_vision_fused_hf_qkv_to_per_head():
    # HF vision qkv bias: [q (2 heads x 2); k; v] over all heads.
    hf_bias = T([100, 101, 102, 103, 200, 201, 202, 203, 300, 301, 302, 303])
    t = GroupedQKV("vision")
    assert t.to_megatron([hf_bias], 0, 1, CTX).tolist() == [100, 101, 200, 201, 300, 301,   # head 0: q, k, v
                                                           102, 103, 202, 203, 302, 303]   # head 1
    shards = [t.to_megatron([hf_bias], r, 2, CTX) for r in range(2)]
    assert shards[0].tolist() == [100, 101, 200, 201, 300, 301]
    assert shards[1].tolist() == [102, 103, 202, 203, 302, 303]
    (back,) = t.to_hf(shards, CTX)
    assert torch.equal(back, hf_bias)
    hf_weight = torch.cat([_rows(1000, 4), _rows(2000, 4), _rows(3000, 4)])
    w = t.to_megatron([hf_weight], 1, 2, CTX)
    assert w[:, 0].tolist() == [1020, 1030, 2020, 2030, 3020, 3030]
    assert torch.equal(t.to_hf([t.to_megatron([hf_weight], r, 2, CTX) for r in range(2)], CTX)[0], hf_weight)


# --------------------------------------------------------------------------------------------
# MLP, vocabulary, plain splits


def test_gated_mlp_rank_holds_its_gate_and_up_halves():
    gate, up = T([10, 11, 12, 13]), T([20, 21, 22, 23])
    t = GatedMLP()
    shards = [t.to_megatron([gate, up], r, 2, CTX) for r in range(2)]
    assert shards[0].tolist() == [10, 11, 20, 21]
    assert shards[1].tolist() == [12, 13, 22, 23]
    assert shards[0].tolist() != torch.chunk(torch.cat([gate, up]), 2)[0].tolist()  # not a chunk of [G; U]
    g2, u2 = t.to_hf(shards, CTX)
    assert torch.equal(g2, gate) and torch.equal(u2, up)
    gw, uw = _rows(1000, 4, 2), _rows(2000, 4, 2)
    w = [t.to_megatron([gw, uw], r, 2, CTX) for r in range(2)]
    assert torch.equal(w[1], torch.stack([gw[2], gw[3], uw[2], uw[3]]))
    assert torch.equal(t.to_megatron([gw, uw], 0, 1, CTX), torch.cat([gw, uw]))
    back = t.to_hf(w, CTX)
    assert torch.equal(back[0], gw) and torch.equal(back[1], uw)


def test_vocab_split_pads_with_zero_rows_splits_and_trims():
    emb = _rows(1, 5, 2)  # 5 tokens, no zero entry anywhere
    t = VocabSplit()
    shards = [t.to_megatron([emb], r, 2, CTX) for r in range(2)]
    assert [s.shape for s in shards] == [(4, 2), (4, 2)]
    assert torch.equal(shards[0], emb[:4])
    assert shards[1].tolist() == [emb[4].tolist(), [0, 0], [0, 0], [0, 0]]
    (back,) = t.to_hf(shards, CTX)
    assert torch.equal(back, emb)
    with pytest.raises(ValueError, match="6 rows"):
        t.to_megatron([_rows(1, 6, 2)], 0, 2, CTX)
    no_pad = MappingContext(**{**CTX.__dict__, "padded_vocab_size": 5})
    assert torch.equal(t.to_megatron([emb], 0, 1, no_pad), emb)


def test_split_and_replicated_round_trip():
    w = _rows(0, 4, 6)
    for tp in (1, 2, 4):
        rows = [Split(0).to_megatron([w], r, tp, CTX) for r in range(tp)]
        assert all(s.shape == (4 // tp, 6) for s in rows)
        assert torch.equal(Split(0).to_hf(rows, CTX)[0], w)
    cols = [Split(1).to_megatron([w], r, 2, CTX) for r in range(2)]
    assert cols[1].tolist() == [[3, 4, 5], [13, 14, 15], [23, 24, 25], [33, 34, 35]]
    assert torch.equal(Split(1).to_hf(cols, CTX)[0], w)
    assert Replicated().to_megatron([w], 1, 2, CTX) is w
    assert Replicated().to_hf([w, w], CTX)[0] is w


# --------------------------------------------------------------------------------------------
# Pieces: what each TP rank writes in place must assemble to to_hf, covering every element once

# Every transform of the table with HF tensors of the CTX geometry, hidden size 3 (biases: 1-D).
_PIECE_CASES = {
    "replicated": (Replicated(), lambda: [_rows(1, 4, 3)]),
    "replicated conv": (Replicated(), lambda: [torch.arange(2 * 3 * 2 * 2 * 2).view(2, 3, 2, 2, 2) + 1]),
    "column": (Split(0), lambda: [_rows(1, 4, 3)]),
    "column bias": (Split(0), lambda: [torch.arange(1, 9)]),
    "row": (Split(1), lambda: [_rows(1, 3, 8)]),
    "vocab": (VocabSplit(), lambda: [_rows(1, 5, 3)]),
    "qkv language": (GroupedQKV("language"), lambda: [_rows(100, 8), _rows(200, 4), _rows(300, 4)]),
    "qkv language bias": (GroupedQKV("language"), lambda: [torch.arange(100, 108), torch.arange(200, 204),
                                                            torch.arange(300, 304)]),
    "qkv vision": (GroupedQKV("vision"), lambda: [_rows(100, 12)]),
    "qkv vision bias": (GroupedQKV("vision"), lambda: [torch.arange(100, 112)]),
    "gated mlp": (GatedMLP(), lambda: [_rows(100, 4), _rows(200, 4)]),
    "gated mlp bias": (GatedMLP(), lambda: [torch.arange(100, 104), torch.arange(200, 204)]),
}
TRANSFORM_CASES = pytest.mark.parametrize("case", sorted(_PIECE_CASES))
TP_SIZES = pytest.mark.parametrize("tp", [1, 2])


def _case(case: str, tp: int):
    """(transform, HF tensors, the shard of every TP rank) for one of the cases above."""
    transform, make = _PIECE_CASES[case]
    hf = make()
    return transform, hf, [transform.to_megatron(hf, r, tp, CTX) for r in range(tp)]


@TRANSFORM_CASES
@TP_SIZES
def test_pieces_of_all_ranks_assemble_to_hf_covering_each_element_once(case, tp):
    transform, hf, shards = _case(case, tp)
    # The reference layout is the input itself (to_hf round-trips it, checked elsewhere).
    assembled = [torch.zeros_like(as_matrix(t)) for t in hf]
    hits = [torch.zeros(as_matrix(t).shape, dtype=torch.int64) for t in hf]
    for rank, shard in enumerate(shards):
        for piece in transform.hf_pieces(shard, rank, tp, CTX):
            rows, cols = piece.block.shape
            assert piece.block.stride(1) == 1, "rows of a piece must be contiguous for in-place writes"
            assembled[piece.index][piece.row:piece.row + rows, piece.col:piece.col + cols] = piece.block
            hits[piece.index][piece.row:piece.row + rows, piece.col:piece.col + cols] += 1
    for original, got, count in zip(hf, assembled, hits):
        assert torch.all(count == 1), f"{case} tp{tp}: elements written {count.unique().tolist()} times"
        assert torch.equal(got.reshape(original.shape), original)


@TRANSFORM_CASES
@TP_SIZES
def test_shape_arithmetic_agrees_with_the_data_path(case, tp):
    """shard_shape / hf_shapes (what the converters check and plan with) match to_megatron / to_hf."""
    transform, hf, shards = _case(case, tp)
    for rank, shard in enumerate(shards):
        assert transform.shard_shape([tuple(t.shape) for t in hf], rank, tp, CTX) == tuple(shard.shape)
        assert transform.hf_shapes(tuple(shard.shape), tp, CTX) == [tuple(t.shape) for t in hf]


@pytest.mark.parametrize("case", sorted(c for c, (t, _) in _PIECE_CASES.items() if hasattr(t, "read_shard")))
@TP_SIZES
def test_lazy_read_shard_into_place_equals_to_megatron(case, tp, tmp_path):
    """read_shard from a real safetensors file, straight into the destination, gives to_megatron's shard."""
    from safetensors.torch import save_file

    from visurf_megatron.checkpoint.safetensors_io import open_hf_checkpoint

    transform, make = _PIECE_CASES[case]
    hf = [t.to(torch.float32) for t in make()]
    save_file({f"t{i}": t for i, t in enumerate(hf)}, str(tmp_path / "model.safetensors"))
    with open_hf_checkpoint(tmp_path) as reader:
        sources = [reader.get_slice(f"t{i}") for i in range(len(hf))]
        for rank in range(tp):
            want = transform.to_megatron(hf, rank, tp, CTX)
            out = torch.full(want.shape, -1.0)
            assert transform.read_shard(sources, rank, tp, CTX, out=out) is out
            assert torch.equal(out, want), f"{case} tp{tp} rank {rank}"
            assert torch.equal(transform.read_shard(sources, rank, tp, CTX), want)


@pytest.mark.parametrize("transform, shapes, message", [
    (GroupedQKV("language"), [(8, 3), (4, 3), (6, 3)], "QKV shapes"),
    (GroupedQKV("vision"), [(13, 3)], "QKV shapes"),
    (GatedMLP(), [(4, 3), (6, 3)], "gate .* and up .* differ"),
    (VocabSplit(), [(6, 3)], "vocabulary tensor has 6 rows"),
    (Split(0), [(5, 3)], "5 rows do not split evenly"),
])
def test_shape_arithmetic_names_what_does_not_fit(transform, shapes, message):
    with pytest.raises(ValueError, match=message):
        transform.shard_shape(shapes, 0, 2, CTX)


# --------------------------------------------------------------------------------------------
# Name lookup


def test_lookup_resolves_layer_wildcards():
    r = lookup("language_model.decoder.layers.7.self_attention.linear_qkv.weight", tied=False)
    assert r.hf_names == ("model.layers.7.self_attn.q_proj.weight", "model.layers.7.self_attn.k_proj.weight",
                          "model.layers.7.self_attn.v_proj.weight")
    assert r.mapping.transform == GroupedQKV("language")
    r = lookup("language_model.decoder.layers.12.mlp.linear_fc1.weight", tied=True)
    assert r.hf_names == ("model.layers.12.mlp.gate_proj.weight", "model.layers.12.mlp.up_proj.weight")
    assert isinstance(r.mapping.transform, GatedMLP)
    r = lookup("vision_model.decoder.layers.31.self_attention.linear_qkv.bias", tied=False)
    assert r.hf_names == ("visual.blocks.31.attn.qkv.bias",) and r.mapping.transform == GroupedQKV("vision")
    assert lookup("vision_model.merger.linear_fc1.weight", False).hf_names == ("visual.merger.mlp.0.weight",)
    assert lookup("language_model.decoder.final_layernorm.weight", True).hf_names == ("model.norm.weight",)


def test_lookup_te_fused_norm_names():
    r = lookup("language_model.decoder.layers.3.self_attention.linear_qkv.layer_norm_weight", tied=False)
    assert r.hf_names == ("model.layers.3.input_layernorm.weight",)
    r = lookup("language_model.decoder.layers.3.mlp.linear_fc1.layer_norm_weight", tied=False)
    assert r.hf_names == ("model.layers.3.post_attention_layernorm.weight",)
    r = lookup("vision_model.decoder.layers.0.mlp.linear_fc1.layer_norm_weight", tied=False)
    assert r.hf_names == ("visual.blocks.0.norm2.weight",)
    # the local spec's separate norms map to the same tensors
    assert lookup("language_model.decoder.layers.3.input_layernorm.weight", False).hf_names == (
        "model.layers.3.input_layernorm.weight",)
    assert lookup("vision_model.decoder.layers.0.pre_mlp_layernorm.weight", False).hf_names == (
        "visual.blocks.0.norm2.weight",)


def test_lookup_tied_and_untied_output_layer():
    untied = lookup("language_model.output_layer.weight", tied=False)
    assert untied.hf_names == ("lm_head.weight",) and untied.mapping.export
    tied = lookup("language_model.output_layer.weight", tied=True)
    assert tied.hf_names == ("model.embed_tokens.weight",) and not tied.mapping.export
    for flag in (True, False):
        emb = lookup("language_model.embedding.word_embeddings.weight", tied=flag)
        assert emb.hf_names == ("model.embed_tokens.weight",) and isinstance(emb.mapping.transform, VocabSplit)


@pytest.mark.parametrize("name", [
    "language_model.decoder.layers.0.self_attention.linear_qkv._extra_state",
    "language_model.decoder.layers.0.mlp.linear_fc1.bias",  # the LM has no MLP bias
    "language_model.decoder.final_layernorm.bias",
    "vision_model.decoder.final_layernorm.weight",
    "something.else",
])
def test_lookup_unknown_name_is_key_error(name):
    with pytest.raises(KeyError, match="no HF mapping"):
        lookup(name, tied=False)


PAIRS = [  # (Hub naming, newer transformers' in-memory naming)
    ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight"),
    ("model.layers.3.self_attn.q_proj.bias", "model.language_model.layers.3.self_attn.q_proj.bias"),
    ("model.norm.weight", "model.language_model.norm.weight"),
    ("visual.blocks.0.attn.qkv.weight", "model.visual.blocks.0.attn.qkv.weight"),
    ("visual.merger.mlp.2.bias", "model.visual.merger.mlp.2.bias"),
    ("visual.patch_embed.proj.weight", "model.visual.patch_embed.proj.weight"),
    ("lm_head.weight", "lm_head.weight"),
]


@pytest.mark.parametrize("hub,mem", PAIRS)
def test_hub_and_inmemory_names_are_inverse(hub, mem):
    assert hub_name(mem) == hub and hub_name(hub) == hub
    assert inmemory_name(hub) == mem and inmemory_name(mem) == mem
    assert hub_name(inmemory_name(hub)) == hub and inmemory_name(hub_name(mem)) == mem


# --------------------------------------------------------------------------------------------
# The table against real tiny checkpoints


# Qwen2.5-VL checkpoints are keyed by kind; the other family's as "<model_type>:<kind>".
KINDS = ["untied", "tied", "qwen2_vl:untied", "qwen2_vl:tied"]


def _family_kind(key: str) -> tuple[str, str]:
    family, _, kind = key.rpartition(":")
    return family or "qwen2_5_vl", kind


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("mapping")
    return {key: build_checkpoint(root, _family_kind(key)[1], family=_family_kind(key)[0]) for key in KINDS}


def _safetensors(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(f, "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


def _expanded_entries(tied: bool, text_layers: int, vision_depth: int, table=QWEN25_VL_MAPPING):
    """(megatron name, hf names, entry) for every table entry of a model of this depth."""
    out = []
    for e in table:
        if e.when is not None and (e.when == "tied") != tied:
            continue
        if e.megatron.startswith("language_model.decoder.layers.*"):
            layers = range(text_layers)
        elif e.megatron.startswith("vision_model.decoder.layers.*"):
            layers = range(vision_depth)
        else:
            layers = [None]
        for i in layers:
            sub = (lambda s: s) if i is None else (lambda s, i=i: s.replace("*", str(i)))
            out.append((sub(e.megatron), tuple(sub(h) for h in e.hf), e))
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_table_covers_every_tensor_of_a_real_checkpoint(checkpoints, kind):
    d = checkpoints[kind]
    family, kind = _family_kind(kind)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == family
    tied = kind == "tied"
    assert cfg["tie_word_embeddings"] is tied
    tensors = _safetensors(d)
    entries = _expanded_entries(tied, cfg["text_config"]["num_hidden_layers"], cfg["vision_config"]["depth"],
                                MAPPINGS[family])
    exported = {h for _, hf, e in entries if e.export for h in hf}
    assert exported == set(tensors), (sorted(set(tensors) - exported), sorted(exported - set(tensors)))
    assert ("lm_head.weight" in tensors) is not tied
    # every expanded megatron name resolves back through lookup to the same HF names
    for meg, hf, entry in entries:
        r = lookup(meg, tied, family)
        assert r.hf_names == hf and r.mapping is entry


@pytest.mark.parametrize("kind", KINDS)
def test_table_round_trips_a_real_checkpoint_bit_exactly(checkpoints, kind):
    from visurf_megatron.models.qwen2_5_vl.config import ParallelLayout, configs_from_hf

    d = checkpoints[kind]
    family, kind = _family_kind(kind)
    cfg = json.loads((d / "config.json").read_text())
    tensors = _safetensors(d)
    entries = _expanded_entries(kind == "tied", cfg["text_config"]["num_hidden_layers"], cfg["vision_config"]["depth"],
                                MAPPINGS[family])
    for tp in (1, 2):
        _, _, extras = configs_from_hf(d, ParallelLayout(tp=tp))
        ctx = MappingContext.from_extras(extras)
        assert ctx.tie_word_embeddings is (kind == "tied")
        for meg, hf, entry in entries:
            shards = [entry.transform.to_megatron([tensors[h] for h in hf], r, tp, ctx) for r in range(tp)]
            if meg.endswith("word_embeddings.weight") or meg.endswith("output_layer.weight"):
                assert sum(s.shape[0] for s in shards) == extras.padded_vocab_size
            back = entry.transform.to_hf(shards, ctx)
            assert len(back) == len(hf)
            for h, t in zip(hf, back):
                assert torch.equal(t, tensors[h]), f"tp={tp} {meg} -> {h}"


def test_hub_name_maps_transformers_state_dict_to_checkpoint_keys(checkpoints):
    from visurf_megatron.models.families import transformers_class

    for key, d in checkpoints.items():
        family, kind = _family_kind(key)
        model = transformers_class(family, "model").from_pretrained(d)
        in_memory = set(model.state_dict())
        assert any(k.startswith("model.language_model.") for k in in_memory)  # the naming really differs
        on_disk = set(_safetensors(d))
        mapped = {hub_name(k) for k in in_memory}
        if kind == "tied":
            mapped.discard("lm_head.weight")  # tied: the state dict repeats the embedding as lm_head
        assert mapped == on_disk
        assert {inmemory_name(k) for k in on_disk} <= in_memory


def test_the_families_differ_only_in_the_vision_norms_and_mlp():
    """Language model, vision attention and merger MLP are one shared block of the table."""
    qwen25, qwen2 = ({(e.megatron, e.when): e for e in MAPPINGS[f]} for f in ("qwen2_5_vl", "qwen2_vl"))
    shared = {k for k in qwen25 if qwen25[k] is qwen2.get(k)}
    differ = sorted(m for m, _ in (set(qwen25) | set(qwen2)) - shared)
    assert all(m.startswith(("vision_model.decoder.layers.*.", "vision_model.merger.ln_q.")) for m in differ), differ
    assert not any("self_attention.linear_qkv.weight" in m or "linear_proj" in m for m in differ)
    assert lookup("vision_model.decoder.layers.2.mlp.linear_fc1.weight", False, "qwen2_vl").hf_names == (
        "visual.blocks.2.mlp.fc1.weight",)
    assert lookup("vision_model.merger.ln_q.bias", True, "qwen2_vl").hf_names == ("visual.merger.ln_q.bias",)
    assert lookup("vision_model.decoder.layers.0.self_attention.linear_qkv.layer_norm_bias", False,
                  "qwen2_vl").hf_names == ("visual.blocks.0.norm1.bias",)
    with pytest.raises(KeyError, match="no HF mapping"):
        lookup("vision_model.merger.ln_q.bias", False)  # RMSNorm: Qwen2.5-VL has no norm bias
    with pytest.raises(ValueError, match="unsupported model_type='qwen3_vl'"):
        lookup("vision_model.merger.ln_q.weight", False, "qwen3_vl")
