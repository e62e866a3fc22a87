"""The in-loop δH probe against exact values, over a real training run.

The real trainer on tiny-random with max_new_tokens 2 (every completion of every eval prompt
can be enumerated), temperature 0.7, AdamW lr 2e-2, a reward of 1 for a completion holding a
digit, the δH probe every step (B_E 8: 4 of the 8 eval prompts × 2) and a checkpoint every step.
From the checkpoints, exact δH₁ = ⟨∇H̄(θ_{k−1}), θ_k − θ_{k−1}⟩ and ΔH = H̄(θ_k) − H̄(θ_{k−1}) in
float64 (H̄: mean over the probe's prompt pool; EOS and `</answer>` end a completion). The
logged 95 % intervals, est ± t_{df}·SE with the logged Satterthwaite df, must cover the exact
values (z = (logged − exact) / logged SE). With 4 prompts per E-batch df is 3–8: ±1.96·SE
would cover ≈ 88–91 % (measured 88 % in one 100-step run), and the probe's SEs are not wrong
for that.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load_file

from probes.evaluation import Float64Mode
from probes.functional.delta_h import t975
from rl_training.config import load_config
from rl_training.data.prompts import STOP_STRINGS
from rl_training.dist import DistInfo
from rl_training.sampling import eos_token_ids
from rl_training.session import build_session
from rl_training.stops import StopRule
from tests.helpers import exact_two_tokens as X
from rl_training.models import TINY_RANDOM, ModelSpec, load_tokenizer_and_model
from tests.helpers.runs import run_in_process, train_log

pytestmark = pytest.mark.slow

STEPS = 100
BE = 8
RUN = (
    f"train.total_steps={STEPS}", "rollout.max_new_tokens=2", "rollout.temperature=0.7", "train.lr=2e-2",
    "data.reward=tests.helpers.exact_two_tokens.has_digit", "data.num_records=60", "checkpoint.save_every=1",
    "checkpoint.keep_last_n=0", "logging.rollout_fraction=0", "logging.text_samples=0",
    f"probes.probes=[{{name: delta_h, kind: delta_h, options: {{batch_size: {BE}}}}}]",
)
FIRST_STEPS = 3  # where the exact spread of the contributions is computed too


@pytest.fixture(scope="module")
def exact_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inloop")
    run = run_in_process(tmp, *RUN)
    logged = train_log(run)
    trainer = build_session(load_config(run / "config.yaml"), DistInfo()).trainer  # θ_0 as in the run
    model = trainer.policy.double().eval()
    probe = next(p for p in trainer.probes.probes if p.kind == "delta_h")
    prompts = [trainer.tokenizer(trainer.prompt_fn(r.question), add_special_tokens=False)["input_ids"] for r in probe.ebatches.pool(probe.spec)]
    always = torch.tensor(StopRule(trainer.tokenizer, eos_token_ids(model, trainer.tokenizer), STOP_STRINGS).always)
    T = trainer.cfg.rollout.temperature

    def theta_at(k):
        if k > 0:
            path = run / "checkpoints" / f"step_{k}" / "adapter" / "adapter_model.safetensors"
            set_peft_model_state_dict(model, load_file(str(path)))
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    rows = []
    with Float64Mode():
        before = theta_at(0)
        H_before = None
        for k in range(1, STEPS + 2):  # one more: H̄ at θ_STEPS
            after = theta_at(k) if k <= STEPS else before
            delta = {n: after[n] - before[n] for n in after}
            H, pred = X.pool_entropy_and_derivative(model, before, delta, prompts, always, T)
            if rows:
                rows[-1]["true"] = H - H_before
            if k > STEPS:
                break
            row = {"step": k, "pred": pred, "H": H, "step_norm": math.sqrt(sum(float((d * d).sum()) for d in delta.values()))}
            if k <= FIRST_STEPS:
                for b in ("zero", "value"):
                    _, sd = X.contribution_moments(model, before, delta, prompts, always, T, b)
                    row[f"sd_{b}"] = float(sd.pow(2).mean().sqrt())  # per sequence, pooled over prompts
            rows.append(row)
            before, H_before = after, H
    (tmp / "exact.json").write_text(json.dumps({"logged": logged, "exact": rows}))
    return logged, rows


@pytest.mark.parametrize("chunk", [160, 10**6])  # the default, and every candidate in one row
def test_tree_forward_equals_the_plain_forward_of_each_sequence(chunk):
    """The exact reference's tree batch (candidates sharing a prompt, left padding) gives the
    log-probs a plain forward of each prompt and of each (prompt, v1) gives."""
    tokenizer, model = load_tokenizer_and_model(ModelSpec(TINY_RANDOM, dtype="float64", seed=3))
    model.eval()
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("Q: 12 + 7 = ?", "Q: how many?")]
    V, T = model.config.vocab_size, 0.7
    with Float64Mode(), torch.no_grad():
        logp1, logp2 = X.first_two_positions(model, {}, prompts, T, chunk=chunk)
        assert logp1.shape == (2, V) and logp2.shape == (2, V, V)
        for i, ids in enumerate(prompts):
            for v1 in (0, 159, 160, 161, V - 1):
                plain = torch.log_softmax(model(torch.tensor([ids + [v1]])).logits[0, -2:].double() / T, -1)
                torch.testing.assert_close(logp1[i], plain[0], rtol=0, atol=1e-12)
                torch.testing.assert_close(logp2[i, v1], plain[1], rtol=0, atol=1e-12)


def _z(logged, exact, key):
    return torch.tensor([(r[f"probe/delta_h/{key}"] - e[key]) / r[f"probe/delta_h/{key}_se"]
                         for r, e in zip(logged, exact, strict=True)], dtype=torch.float64)


def _t(logged, key):
    return torch.tensor([t975(r[f"probe/delta_h/{key}_df"]) for r in logged], dtype=torch.float64)


@pytest.mark.parametrize("key", ["pred", "true", "H"])
def test_logged_intervals_cover_the_exact_values(exact_run, key):
    logged, exact = exact_run
    z, t = _z(logged, exact, key), _t(logged, key)
    coverage = float((z.abs() <= t).double().mean())
    normal = float((z.abs() <= 1.96).double().mean())
    mean_z, se_mean = float(z.mean()), float(z.std() / math.sqrt(len(z)))
    stops = sum(r["probe/delta_h/stop_frac"] > 0 for r in logged)
    share = sum(abs(r["probe/delta_h/pred_stop"]) for r in logged) / sum(abs(r["probe/delta_h/pred"]) for r in logged)
    print(f"stop term: {share:.2f} of |δH₁| summed over steps")
    print(f"{key}: coverage {coverage:.3f} (±1.96: {normal:.3f}; median t {float(t.median()):.2f}) over {len(z)} "
          f"steps, mean z {mean_z:+.2f} ± {se_mean:.2f}, sd z {float(z.std()):.2f}, max |z| {float(z.abs().max()):.1f}; "
          f"E-batches with a stop: {stops}")
    assert 0.90 <= coverage <= 0.99, coverage
    assert abs(mean_z) < 3 * se_mean, (mean_z, se_mean)


def test_first_step_spread_was_the_missing_baseline(exact_run):
    """The exact spread of the contributions at the first steps: with b = 0 (what the probe used
    at its first due step) it is the score of token 1 times a whole future of ≈ log 772 nats;
    with the value baseline it is 10²–10³× smaller, and the logged SE follows it from step 1."""
    logged, exact = exact_run
    for r, e in zip(logged[:FIRST_STEPS], exact[:FIRST_STEPS]):
        print(f"step {e['step']}: |Δθ| {e['step_norm']:.3g}, exact δH₁ {e['pred']:.3g}; sd of contributions: "
              f"b = 0 {e['sd_zero']:.3g}, value baseline {e['sd_value']:.3g}; logged pred_se × √B_E "
              f"{r['probe/delta_h/pred_se'] * math.sqrt(BE):.3g}")
        assert e["sd_zero"] > 30 * e["sd_value"]
        assert r["probe/delta_h/pred_se"] * math.sqrt(BE) < 5 * e["sd_value"]
