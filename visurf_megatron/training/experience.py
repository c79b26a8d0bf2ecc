"""One step's experience: rollouts from the engine, GT rows in the rollout style, rewards.

Every rank of one model-parallel group (TP x PP, one data-parallel replica) must train on the same
rows: a single differing token changes padded shapes (a hang) or TP sums (silently wrong).

* Engines that are not SPMD (the transformers engine) generate on model-parallel rank 0 of each
  replica; the completions are broadcast to the other ranks of the group.
* The SPMD vLLM engine forms one rollout replica per ``rollout.tp`` consecutive ranks, so a
  model-parallel group holds ``tp * pp / rollout.tp`` of them. The group's requests are split into
  contiguous shares, one per replica (each request keeps its seed index), every replica generates its
  share, and the shares are all-gathered over the group: every rank then holds the same completions,
  and all of the group's replicas work.
"""
from __future__ import annotations

import concurrent.futures as futures
import dataclasses
from typing import Callable, Optional, Sequence

import torch.distributed as dist
from megatron.core import parallel_state

from visurf_megatron.data.gt_style import render_ground_truth
from visurf_megatron.rewards.types import RewardBreakdown
from visurf_megatron.rollout.base import RolloutRequest

from .batching import PreparedPrompt, Row, gt_response_ids

# Used when control 1 (align the GT with the rollout style) is off: the dataset's raw JSON form.
UNALIGNED_GT_STYLE = "nothink_spaced"


def is_generating_rank() -> bool:
    return parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_pipeline_model_parallel_rank() == 0


def broadcast_within_model_parallel(obj):
    """Send ``obj`` from model-parallel rank 0 to the other ranks of this DP replica."""
    group = parallel_state.get_model_parallel_group()
    if dist.get_world_size(group) == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=dist.get_global_rank(group, 0), group=group)
    return holder[0]


def replica_shares(group_ranks: Sequence[int], rank: int, rollout_tp: int, n_requests: int):
    """(share index, number of shares, [start, stop) of this rank's requests, leader flag) for the
    rollout replicas (``rollout_tp`` consecutive global ranks) inside one model-parallel group (pure)."""
    if rank not in group_ranks:
        raise ValueError(f"rank {rank} is not in the model-parallel group {list(group_ranks)}")
    replicas = sorted({r // rollout_tp for r in group_ranks})
    if len(set(group_ranks)) != len(replicas) * rollout_tp:
        raise ValueError(f"rollout replicas of {rollout_tp} consecutive ranks do not tile the model-parallel "
                         f"group {list(group_ranks)}; rollout.tp must divide parallel.tp")
    index, count = replicas.index(rank // rollout_tp), len(replicas)
    base, extra = divmod(n_requests, count)
    start = index * base + min(index, extra)
    stop = start + base + (1 if index < extra else 0)
    return index, count, (start, stop), rank % rollout_tp == 0


def generate_spmd_shares(engine, requests: Sequence[RolloutRequest], sampling):
    """SPMD engine: each rollout replica of this model-parallel group generates its share of
    ``requests``; the shares are all-gathered so every rank of the group returns all completions."""
    group = parallel_state.get_model_parallel_group()
    ranks = dist.get_process_group_ranks(group)
    index, count, (start, stop), leader = replica_shares(ranks, dist.get_rank(), engine.tensor_parallel_size,
                                                         len(requests))
    mine = engine.generate(requests[start:stop], sampling, first_index=start)
    if count == 1:
        return mine
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (index, leader, mine), group=group)
    shares = {i: part for i, lead, part in gathered if lead}
    completions = [c for i in range(count) for c in shares[i]]
    if len(completions) != len(requests):
        raise RuntimeError(f"gathered {len(completions)} rollout groups for {len(requests)} requests")
    return completions


def generate_rollouts(engine, prompts: Sequence[PreparedPrompt], sampling, *, spmd: bool = False,
                      call_index: Optional[int] = None):
    """[prompt][G] completions, identical on every rank of the model-parallel group (module doc).

    ``call_index`` (the training step) fixes the engine's per-call seed offset, so a resumed run
    samples exactly the rollouts the uninterrupted run would have.
    """
    requests = [RolloutRequest(prompt=p.text, images=tuple(p.images)) for p in prompts]
    if engine is not None and call_index is not None:
        engine.calls = call_index
    if spmd:
        return generate_spmd_shares(engine, requests, sampling)
    completions = engine.generate(requests, sampling) if is_generating_rank() else None
    return broadcast_within_model_parallel(completions)


def gt_sample(prompt: PreparedPrompt):
    """The sample with its solution in the resized image's frame (what the policy sees)."""
    sample = prompt.sample
    if sample.task in ("grounding", "gui"):
        return dataclasses.replace(sample, solution=prompt.solution)
    return sample


def cut_at_forbidden(ids: Sequence[int], logprobs: Sequence[float], forbidden: set[int]):
    """A response must not contain vision placeholder tokens (they would claim image embeddings that
    do not exist); keep the prefix before the first one. Returns (ids, logprobs, was_cut)."""
    for i, t in enumerate(ids):
        if t in forbidden:
            return list(ids[:i]), list(logprobs[:i]), True
    return list(ids), list(logprobs), False


def build_rows(prompts: Sequence[PreparedPrompt], completions, *, with_gt: bool, gt_style: str, tokenizer,
               end_of_turn_id: int, forbidden_ids: Sequence[int] = ()) -> list[Row]:
    rows: list[Row] = []
    forbidden = set(forbidden_ids)
    for index, prompt in enumerate(prompts):
        for c in completions[index] if completions is not None else ():
            ids, logprobs, cut = cut_at_forbidden(c.response_token_ids, c.logprobs, forbidden)
            text = tokenizer.decode(ids, skip_special_tokens=True) if cut else c.text
            rows.append(Row(prompt=index, response_ids=ids, is_gt=False, text=text, engine_logprobs=logprobs,
                            finish_reason="cut" if cut else c.finish_reason))
        if with_gt:
            text = render_ground_truth(gt_sample(prompt), gt_style)
            rows.append(Row(prompt=index, response_ids=gt_response_ids(tokenizer, text, end_of_turn_id),
                            is_gt=True, text=text))
    return rows


def score_rows(rows: Sequence[Row], prompts: Sequence[PreparedPrompt], reward_fn: Callable, *,
               gt_no_thinking: bool, workers: int = 2, timeout_s: float = 10.0) -> None:
    """Fill ``row.reward`` in a bounded thread pool; a reward that errors or overruns scores 0."""
    zero = RewardBreakdown().as_dict()

    def score(row: Row) -> dict:
        solution = prompts[row.prompt].solution
        return reward_fn(row.text, solution, is_ground_truth=row.is_gt and gt_no_thinking).as_dict()

    with futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        jobs = [pool.submit(score, row) for row in rows]
        for row, job in zip(rows, jobs):
            try:
                row.reward = job.result(timeout=timeout_s)
            except (futures.TimeoutError, ValueError, RuntimeError, TypeError):
                row.reward = dict(zero)


def reward_tensors(rows: Sequence[Row], compare: str, correct_threshold: float):
    """(rewards, compare_rewards or None, correct) as lists for ``RowBatch``."""
    rewards = [r.reward["total"] for r in rows]
    accuracy = [r.reward["accuracy"] for r in rows]
    compare_rewards: Optional[list] = accuracy if compare == "accuracy" else None
    correct = [a >= correct_threshold for a in accuracy]
    return rewards, compare_rewards, correct
