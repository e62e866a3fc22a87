"""E-batches: the plan, the checks, and one generation per step for every probe that shares a spec."""

import re

import pytest
import torch

from probes.ebatch import EBatch, EBatchSpec, ebatch_plan
from rl_training.errors import ConfigError


def _session(*overrides):
    from rl_training.config import load_config
    from rl_training.dist import DistInfo
    from rl_training.session import build_session
    from tests.helpers.runs import TINY

    return build_session(load_config(TINY, list(overrides)), DistInfo())


def test_plan_draws_prompts_without_replacement_and_spreads_completions():
    plan = ebatch_plan(pool_size=10, batch_size=7, per_prompt=2, seed=0, step=3)
    prompts = [p for p, _ in plan]
    assert len(plan) == 7 and len(set(prompts)) == 3
    assert sorted(prompts.count(p) for p in set(prompts)) == [2, 2, 3]
    assert plan == ebatch_plan(10, 7, 2, 0, 3) and plan != ebatch_plan(10, 7, 2, 0, 4)
    assert {p for p, _ in ebatch_plan(4, 16, 2, 0, 1)} == {0, 1, 2, 3}  # the whole pool, 4 each


def test_one_generation_per_step_for_probes_that_share_a_spec(monkeypatch):
    s = _session("probes.probes=[{name: a, kind: delta_h, options: {batch_size: 8}},"
                 " {name: b, kind: delta_h, options: {batch_size: 8}}]")
    source = s.trainer.probes.probes[0].ebatches
    assert s.trainer.probes.probes[1].ebatches is source
    out = s.trainer.train_step()
    assert source.generations == 1
    for key in ("pred", "pred_se", "true", "H", "n"):
        assert out.metrics[f"probe/a/{key}"] == out.metrics[f"probe/b/{key}"], key
    s.trainer.train_step()
    assert source.generations == 2  # a new step, a new E-batch


def test_a_different_spec_generates_its_own():
    s = _session("probes.probes=[{name: a, kind: delta_h, options: {batch_size: 8}},"
                 " {name: b, kind: delta_h, options: {batch_size: 4}}]")
    s.trainer.train_step()
    assert s.trainer.probes.probes[0].ebatches.generations == 2


@pytest.mark.parametrize("spec, match", [
    (EBatchSpec("heldout", 8, 2), "pool must be eval|train"),
    (EBatchSpec("eval", 1, 1), "batch_size .* must be >= 2"),
    (EBatchSpec("eval", 3, 2), "draws 1 of"),
])
def test_specs_without_a_standard_error_are_refused(spec, match):
    from probes.base import SetupContext

    s = _session("probes.probes=[]")
    source = SetupContext(s.cfg, s.world, s.trainer.policy, s.trainer.tokenizer, {}, eval_records=s.eval_records,
                          train_records=s.train_records, prompt_fn=s.trainer.prompt_fn).ebatches
    source.check(EBatchSpec("eval", 8, 2), "probe 'x'")
    with pytest.raises(ConfigError, match=match):
        source.check(spec, "probe 'x'")


def _count_calls(monkeypatch, trainer):
    """Rows of every engine call of the step's rollouts."""
    calls = []
    generate = trainer.engine.generate

    def counted(prompts, seeds, **settings):
        calls.append(len(prompts))
        return generate(prompts, seeds, **settings)

    monkeypatch.setattr(trainer.engine, "generate", counted)
    return calls


@pytest.mark.parametrize("merge", ["never", "always"])
def test_the_ebatch_rides_in_the_first_rollout_call_and_is_the_same_ebatch(monkeypatch, merge):
    """Also with LoRA merged into the generation weights: in fp32 the same tokens, and the δH
    probe reports how far the sampler's policy is from the one it evaluates (rounding only)."""
    s = _session("probes.probes=[{name: a, kind: delta_h, options: {batch_size: 8}}]", "rollout.filter_groups=false",
                 f"rollout.merge_lora={merge}")
    tr = s.trainer
    spec = tr.probes.probes[0].spec
    alone = tr.ebatches.sample(tr.policy, 1, spec)  # at θ_0, what a separate pass would draw
    calls = _count_calls(monkeypatch, tr)
    monkeypatch.setattr("probes.ebatch.sample", lambda *a, **k: pytest.fail("a second decode pass"))
    out = tr.train_step()
    G = s.cfg.rollout.group_size
    rollout_rows = s.cfg.rollout.prompts_per_round * G
    first = min(max(1, s.cfg.rollout.generation_batch_size // G) * G, rollout_rows)
    assert calls[0] == first + 8  # the E-batch's 8 rows ride in the first call
    assert sum(calls) == rollout_rows + 8
    rode = tr.ebatches.get(tr.policy, 1, spec)
    assert tr.ebatches.generations == 2  # `alone`, and the one that rode
    assert rode.prompt.tolist() == alone.prompt.tolist()
    for a, b in zip(rode.tensors, alone.tensors):
        assert torch.equal(a, b)
    assert out.metrics["probe/a/n"] == 8
    assert 0 < out.metrics["probe/a/sampler_gap_tok"] < 1e-5  # fp32 rounding
    assert out.metrics["probe/a/sampler_ess_frac"] > 1 - 1e-6


def test_sampler_log_ratios_are_the_evaluated_minus_the_sampled_log_probs():
    from rl_training.sampling import Completions

    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    sampled = torch.randn(3, 4) * mask
    lp = sampled.double() + torch.tensor([[0.1], [-0.2], [0.3]])  # the evaluated policy, shifted per row
    ebatch = EBatch(Completions(mask, mask, mask, mask, ["", "", ""], logp=sampled), torch.arange(3))
    ls = ebatch.sampler_log_ratios(slice(1, 3), lp[1:, :3])
    want = torch.tensor([[-0.2, -0.2, 0.0], [0.3, 0.3, 0.3]], dtype=torch.float64)
    torch.testing.assert_close(ls, want, rtol=0, atol=1e-6)
    no_logp = EBatch(Completions(mask, mask, mask, mask, ["", "", ""]), torch.arange(3))
    assert no_logp.sampler_log_ratios(slice(0, 3), lp) is None


def test_the_delta_h_probe_weights_a_bf16_samplers_e_batch_back_to_the_evaluated_policy():
    """bf16 decoding samples a policy a rounding away from the float32 one the probe evaluates:
    per_decision moves the estimates by that little (well inside their SE), none leaves them the
    sampler's; both probes share one E-batch and its sampler gap."""
    s = _session("probes.probes=[{name: a, kind: delta_h, options: {batch_size: 8}},"
                 " {name: b, kind: delta_h, options: {batch_size: 8, sampler_correction: none}}]", "model.dtype=bfloat16")
    out = s.trainer.train_step().metrics
    assert s.trainer.probes.probes[0].ebatches.generations == 1
    assert out["probe/a/sampler_gap_tok"] == out["probe/b/sampler_gap_tok"] > 1e-5
    for key in ("pred", "true", "H"):
        a, b = out[f"probe/a/{key}"], out[f"probe/b/{key}"]
        assert a != b and abs(a - b) < 0.1 * out[f"probe/b/{key}_se"], key
    with pytest.raises(ConfigError, match=re.escape("sampler_correction must be per_decision|none, got 'snis'")):
        _session("probes.probes=[{name: a, kind: delta_h, options: {sampler_correction: snis}}]")
