"""The domain teacher scores every sample with the teacher of the sample's own domain (real Serve),
at the rollout's temperature."""

import pytest
import ray
from ray import serve

from relaxrl.engines.hf_generation import HFGenerationEngine
from relaxrl.models.tiny import build_tiny_model, build_tokenizer
from relaxrl.sample import Sample
from relaxrl.services.domain_teacher import DomainTeacher

pytestmark = pytest.mark.ray
T = 0.7  # rollout.temperature: what launch gives the role


@pytest.fixture(scope="module")
def teacher_dirs(tmp_path_factory):
    """Two different tiny models (different init seeds) as the teachers of domains add and sub."""
    tok = build_tokenizer()
    dirs = {}
    for domain, seed in (("add", 1), ("sub", 2)):
        d = tmp_path_factory.mktemp(f"teacher-{domain}")
        build_tiny_model(tok, hidden_size=64, num_heads=2, num_kv_heads=1, intermediate_size=64, seed=seed) \
            .save_pretrained(d)
        tok.save_pretrained(d)
        dirs[domain] = str(d)
    return dirs


def samples_for(domains):
    return [Sample(uid=f"g{i}/0", group_id=f"g{i}", index=0, prompt_ids=[2, 5 + i, 6], domain=d,
                   response_ids=[7, 8 + i, 1]) for i, d in enumerate(domains)]


def test_each_sample_is_scored_by_its_own_domains_teacher(ray_local, teacher_dirs):
    direct = {d: HFGenerationEngine.from_pretrained(p) for d, p in teacher_dirs.items()}
    app = DomainTeacher.options(ray_actor_options={"num_cpus": 0}).bind(teacher_dirs, temperature=T)
    handle = serve.run(app, name="domain-teacher-test", route_prefix=None)
    try:
        domains = ["add", "sub", "sub", "add"]
        samples = samples_for(domains)
        scored = handle.score.remote(samples).result()  # no model id: split by the samples' domains
        for s, out in zip(samples, scored):
            seq, plen = [s.prompt_ids + s.response_ids], [len(s.prompt_ids)]
            own = direct[s.domain].score(seq, plen, temperature=T).logprobs[0]
            other_domain = "sub" if s.domain == "add" else "add"
            other = direct[other_domain].score(seq, plen, temperature=T).logprobs[0]
            assert out.teacher_logprobs == pytest.approx(own, abs=1e-5)
            assert out.teacher_logprobs != pytest.approx(other, abs=1e-3)  # the teachers really differ
        # Routed as the driver does it: one group per request with multiplexed_model_id=domain.
        sub_only = [s for s in samples if s.domain == "sub"]
        routed = handle.options(multiplexed_model_id="sub").score.remote(sub_only).result()
        assert [r.teacher_logprobs for r in routed] == [x.teacher_logprobs for x in scored if x.domain == "sub"]
        with pytest.raises(ray.exceptions.RayTaskError, match="carries samples of domains"):
            handle.options(multiplexed_model_id="add").score.remote(sub_only).result()
        with pytest.raises(ray.exceptions.RayTaskError, match="no teacher for domain"):
            handle.score.remote(samples_for(["mul"])).result()
        assert handle.stats.remote().result()["loads"] == {"add": 1, "sub": 1}  # lazily, once each
    finally:
        serve.delete("domain-teacher-test")
