"""Our Dr-GRPO loss and LoRA gradient equal TRL 1.16's ``GRPOTrainer`` on the same batch.

TRL runs for real (``loss_type="dr_grpo"``, ``scale_rewards="none"``, ``beta=0``, T = 0.7,
ε_low = 0.2, ε_high = 0.28) on the tiny-random model with LoRA. A ``rollout_func`` hands TRL
our hand-made token ids instead of sampling, so its own ``_generate_and_score_completions``
pads the batch, scores the rewards and computes the advantages (all checked against ours),
and its ``_compute_loss`` gives the loss whose LoRA gradient we compare with ours
(``policy.completion_logits`` -> ``policy.token_logprobs`` -> ``dr_grpo_loss``).

What may differ, and why it does not here:
- Normalisers. TRL divides Σ_t loss by ``per_token_loss.size(0) × max_completion_length``
  (the rows of the microbatch it is given) and then by ``current_gradient_accumulation_steps``;
  ours divides by N × L_budget with N the sequences of the whole optimizer step. With one
  microbatch holding the whole step (8 rows, accumulation 1) they coincide, as they do for k
  equal microbatches (B_mb · k = N); they differ only if microbatches have unequal sizes.
  ``current_gradient_accumulation_steps`` is set by ``Trainer.train``'s loop, so we set it to 1.
- Position ids. Ours numbers positions from each row's first real token (as ``generate``
  does); TRL passes none, so a left-padded row is shifted by its padding. RoPE attention
  scores depend only on position differences, so the results agree up to float error.
- Temperature. Both divide the logits by T before the log-softmax (TRL in its fused LM head).
"""

from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from rl_training import policy  # noqa: E402
from rl_training.algs.dr_grpo import dr_grpo_loss, group_advantages  # noqa: E402
from rl_training.models import TINY_RANDOM, ModelSpec, apply_lora, load_tokenizer_and_model  # noqa: E402

T, EPS_LOW, EPS_HIGH = 0.7, 0.2, 0.28
G, L_BUDGET = 4, 12
TOL = 1e-5
QUESTIONS = ("What is 12 + 30?", "Anna has 7 apples and buys 5 more. How many apples does Anna have now?")
# Completion lengths (some rows shorter than others, one of length 1) and rewards with
# variance in each group, including a non-binary one.
LENGTHS = ((6, 3, 12, 8), (10, 1, 5, 7))
REWARDS = ((1.0, 0.0, 0.5, 0.0), (0.0, 1.0, 1.0, 0.25))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ (Frobenius), in float64."""
    a, b = a.double(), b.double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def pad(rows: list[list[int]], value: int, left: bool) -> torch.Tensor:
    side = "left" if left else "right"
    return torch.nn.utils.rnn.pad_sequence([torch.tensor(r) for r in rows], True, value, side)


def lora_grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for p in model.parameters():
        p.grad = None
    return grads


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tokenizer, base = load_tokenizer_and_model(ModelSpec(TINY_RANDOM, seed=0))
    model = apply_lora(base, r=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "v_proj"], seed=0)
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B = 0 would leave ∂loss/∂A = 0 and test nothing there
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    model.train()  # TRL's mode ("train" vs "eval") comes from model.training; no dropout anywhere

    # The batch: 2 prompts × G, random non-special completion tokens, each completion distinct.
    prompts = [q for q in QUESTIONS for _ in range(G)]
    prompt_rows = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    completion_rows = [
        torch.randint(3, len(tokenizer), (n,), generator=gen).tolist() for group in LENGTHS for n in group
    ]
    rewards = torch.tensor(REWARDS).flatten()
    reward_of = {tuple(c): float(r) for c, r in zip(completion_rows, rewards)}
    assert len(reward_of) == len(completion_rows)

    def rollout_func(trl_prompts, trainer):
        assert trl_prompts == prompts
        return {"prompt_ids": prompt_rows, "completion_ids": completion_rows, "logprobs": None}

    def table_reward(prompts, completions, completion_ids, **kwargs):
        return [reward_of[tuple(c)] for c in completion_ids]

    args = trl.GRPOConfig(
        output_dir=str(tmp_path_factory.mktemp("trl")), use_cpu=True, report_to=[], bf16=False,
        loss_type="dr_grpo", scale_rewards="none", beta=0.0,
        max_completion_length=L_BUDGET, num_generations=G, per_device_train_batch_size=len(prompts),
        gradient_accumulation_steps=1, temperature=T, epsilon=EPS_LOW, epsilon_high=EPS_HIGH,
        gradient_checkpointing=False, use_vllm=False, logging_steps=1, save_strategy="no", seed=0,
    )  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is "experimental"
        trainer = trl.GRPOTrainer(
            model=model, reward_funcs=table_reward, args=args, processing_class=tokenizer,
            train_dataset=datasets.Dataset.from_dict({"prompt": list(QUESTIONS)}), rollout_func=rollout_func,
        )  # fmt: skip
    # Set by Trainer.train's loop; one microbatch is the whole optimizer step here.
    trainer.current_gradient_accumulation_steps = 1
    trl_inputs = trainer._generate_and_score_completions([{"prompt": p} for p in prompts])

    ours = {
        "prompt_ids": pad(prompt_rows, tokenizer.pad_token_id, left=True),
        "prompt_mask": pad([[1] * len(r) for r in prompt_rows], 0, left=True),
        "completion_ids": pad(completion_rows, tokenizer.pad_token_id, left=False),
        "completion_mask": pad([[1] * len(r) for r in completion_rows], 0, left=False),
        "advantages": group_advantages(rewards, G),
    }
    return model, trainer, trl_inputs, ours


def our_loss(model, b: dict, old_logp: torch.Tensor | None):
    logits = policy.completion_logits(
        model, b["prompt_ids"], b["prompt_mask"], b["completion_ids"], b["completion_mask"], T
    )
    logp = policy.token_logprobs(logits, b["completion_ids"])
    return logp, dr_grpo_loss(
        logp, logp.detach() if old_logp is None else old_logp, b["advantages"], b["completion_mask"],
        num_sequences=len(b["advantages"]), l_budget=L_BUDGET, eps_low=EPS_LOW, eps_high=EPS_HIGH,
    )  # fmt: skip


def test_trl_builds_the_same_batch_and_advantages(setup):
    _, _, trl_inputs, ours = setup
    for key in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask"):
        assert torch.equal(trl_inputs[key].cpu(), ours[key]), key
    # scale_rewards="none": A = r − group mean, no std division, exactly as ours.
    torch.testing.assert_close(trl_inputs["advantages"].cpu(), ours["advantages"], rtol=0, atol=1e-7)
    assert trl_inputs.get("old_per_token_logps") is None  # on-policy: TRL reuses logp.detach()


@pytest.mark.parametrize("off_policy", [False, True], ids=["on_policy", "clipped_ratios"])
def test_loss_and_lora_grads_equal_trl(setup, off_policy):
    model, trainer, trl_inputs, ours = setup
    trl_inputs = dict(trl_inputs)
    old = None
    if off_policy:
        # Behaviour log-probs = logp − δ, δ ~ N(0, 0.3²): ratios e^δ fall outside [0.8, 1.28] for
        # some tokens, so both clips are exercised. Zero on padding, like policy.score.
        with torch.no_grad():
            logp, _ = our_loss(model, ours, None)
        delta = 0.3 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(7))
        old = (logp - delta) * ours["completion_mask"]
        trl_inputs["old_per_token_logps"] = old

    for p in model.parameters():
        p.grad = None
    trl_loss = trainer._compute_loss(model, trl_inputs)
    trl_loss.backward()
    trl_grads = lora_grads(model)

    _, terms = our_loss(model, ours, old)
    terms.loss.backward()
    our_grads = lora_grads(model)

    loss_diff = rel(terms.loss.detach(), trl_loss.detach())
    diffs = {n: rel(our_grads[n], trl_grads[n]) for n in trl_grads}
    print(f"loss {terms.loss.item():.6g} vs TRL {trl_loss.item():.6g}: rel diff {loss_diff:.2e}; "
          f"max LoRA grad rel diff {max(diffs.values()):.2e}")  # visible with pytest -s
    assert loss_diff <= TOL, (terms.loss.item(), trl_loss.item())
    assert set(our_grads) == set(trl_grads) and len(our_grads) == 8  # 2 layers × {q, v} × {A, B}
    assert all(float(g.abs().max()) > 0 for g in trl_grads.values())
    assert max(diffs.values()) <= TOL, diffs

    # Clip statistics agree too (TRL logs the clipped fraction of completion tokens).
    clip_frac = float(terms.clipped_tokens / terms.tokens)
    assert clip_frac == pytest.approx(trainer._metrics["train"]["clip_ratio/region_mean"][-1], abs=1e-9)
    if off_policy:  # both sides of the clip are active somewhere
        assert trainer._metrics["train"]["clip_ratio/low_mean"][-1] > 0
        assert trainer._metrics["train"]["clip_ratio/high_mean"][-1] > 0
    else:
        assert clip_frac == 0.0
