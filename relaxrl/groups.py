"""Prompt groups and the samples built from their generations (no Ray: shared by the rollout role
and by the bare single-process loop the benchmarks compare against)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from relaxrl.engines.base import Generation
from relaxrl.sample import Sample


@dataclass
class GroupRequest:
    group_id: str
    prompt_ids: list[int]
    n: int
    domain: str = "default"
    env: str = ""
    answer: Optional[str] = None
    seed: Optional[int] = None
    # Generate with weights of at least this version: a request sent ahead (rollout.admit_ahead_steps)
    # waits in the rollout for them. Never lower than what the staleness bound needs.
    min_version: int = 0


def prompts_of(requests: Sequence[GroupRequest]) -> list[list[int]]:
    """One prompt per sample: each request's prompt repeated ``n`` times, in request order."""
    return [r.prompt_ids for r in requests for _ in range(r.n)]


def samples_from_generations(
    requests: Sequence[GroupRequest],
    gens: Sequence[Generation],
    tokenizer: Any,
    version: int,
    timings: dict[str, float],
) -> list[list[Sample]]:
    """Split the generations of ``prompts_of(requests)`` back into one sample group per request."""
    if len(gens) != sum(r.n for r in requests):
        raise ValueError(f"{len(gens)} generations for {sum(r.n for r in requests)} requested samples")
    out, it = [], iter(gens)
    timings = dict(timings)  # one dict for all the call's samples (see ``Sample.timings``)
    for r in requests:
        group, prompt = [], list(r.prompt_ids)  # a group's samples share their prompt's list
        for k in range(r.n):
            g = next(it)
            # The verifier sees the text without the EOS token the model stopped on.
            text_ids = g.response_ids[:-1] if g.finish_reason == "stop" else g.response_ids
            group.append(
                Sample(
                    uid=f"{r.group_id}/{k}",
                    group_id=r.group_id,
                    index=k,
                    prompt_ids=prompt,
                    domain=r.domain,
                    env=r.env,
                    answer=r.answer,
                    response_ids=g.response_ids,
                    loss_mask=[1] * len(g.response_ids),
                    behaviour_logprobs=g.logprobs,
                    policy_version=version,
                    finish_reason=g.finish_reason,
                    response_text=tokenizer.decode(text_ids, skip_special_tokens=True),
                    timings=timings,
                )
            )
        out.append(group)
    return out


def groups_per_request(configured: int, batch_max_groups: int, groups_per_step: int, num_replicas: int) -> int:
    """Groups the driver sends in one rollout request (then one reward call and one queue put).

    ``configured`` 0 picks enough requests per step to keep every rollout replica busy, capped by
    what one generate call may hold (``batch_max_groups``)."""
    if configured < 0 or batch_max_groups < 1 or num_replicas < 1:
        raise ValueError(f"need rollout.groups_per_request >= 0, rollout.batch_max_groups >= 1 and "
                         f"rollout.num_replicas >= 1; got {configured}, {batch_max_groups}, {num_replicas}")
    if configured > batch_max_groups:
        raise ValueError(f"rollout.groups_per_request={configured} exceeds rollout.batch_max_groups="
                         f"{batch_max_groups}, the most groups one generate call may hold")
    return configured or max(1, min(batch_max_groups, -(-groups_per_step // num_replicas)))
