"""training.experience.replica_shares: how a model-parallel group's requests are split over the vLLM
replicas (``rollout.tp`` consecutive global ranks) inside it."""
import pytest

from visurf_megatron.training.experience import replica_shares


def test_one_replica_takes_everything():
    assert replica_shares([0, 1], 1, 2, 5) == (0, 1, (0, 5), False)
    assert replica_shares([0, 1], 0, 2, 5) == (0, 1, (0, 5), True)


def test_shares_are_contiguous_cover_every_request_once_and_differ_by_at_most_one():
    # TP4 x PP2 group of a 16-rank world (megatron order tp-dp-pp: stage 1 starts at rank 8), rollout TP2.
    group = [4, 5, 6, 7, 12, 13, 14, 15]
    for n in range(0, 11):
        spans = {}
        for rank in group:
            index, count, span, leader = replica_shares(group, rank, 2, n)
            assert count == 4 and leader == (rank % 2 == 0)
            spans.setdefault(index, set()).add(span)
        assert all(len(s) == 1 for s in spans.values()), "ranks of one replica get the same share"
        ordered = [next(iter(spans[i])) for i in range(4)]
        assert ordered[0][0] == 0 and ordered[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ordered, ordered[1:]))
        sizes = [b - a for a, b in ordered]
        assert max(sizes) - min(sizes) <= 1


def test_bad_layouts_are_refused():
    with pytest.raises(ValueError, match="not in the model-parallel group"):
        replica_shares([0, 1], 2, 1, 4)
    with pytest.raises(ValueError, match="rollout.tp must divide parallel.tp"):
        replica_shares([1, 2], 1, 2, 4)  # a rollout replica {0,1} or {2,3} straddles the group
