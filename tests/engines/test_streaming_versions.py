"""Per-token versions of the streaming path, without an engine: vLLM's weight-version spans to
``Generation.token_versions``, and those to a sample's ``policy_version``/``token_versions``."""

from dataclasses import dataclass

from relaxrl.engines.base import Generation
from relaxrl.engines.vllm_generation import spans_to_versions
from relaxrl.sample import Sample


@dataclass
class Span:  # the fields of vLLM's WeightVersionSpan
    version: str
    start: int
    end: int


def test_spans_to_versions():
    assert spans_to_versions([Span("3", 0, 2), Span("4", 2, 5)], 5, 3) == [3, 3, 4, 4, 4]
    assert spans_to_versions(None, 3, 7) == [7, 7, 7]  # no label reported: the version at the start
    assert spans_to_versions([Span("default", 0, 2)], 2, 0) == [0, 0]  # vLLM's label before any update


def test_sample_takes_the_oldest_version_and_the_list_only_when_mixed():
    import pytest

    pytest.importorskip("ray")
    from relaxrl.services.rollout import with_token_versions

    def sample():
        return Sample(uid="g/0", group_id="g", index=0, prompt_ids=[1], response_ids=[5, 6, 7], policy_version=9)

    mixed = with_token_versions(sample(), Generation([5, 6, 7], [-1.0] * 3, "length", [2, 2, 3]))
    assert mixed.policy_version == 2 and mixed.token_versions == [2, 2, 3] and mixed.oldest_version == 2
    one = with_token_versions(sample(), Generation([5, 6, 7], [-1.0] * 3, "length", [4, 4, 4]))
    assert one.policy_version == 4 and one.token_versions == []
    assert with_token_versions(sample(), Generation([5, 6, 7], [-1.0] * 3, "length")).policy_version == 9
