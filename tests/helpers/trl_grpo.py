"""TRL 1.16's GRPOTrainer with our probes (``probes/trl_callback.py``), for the tests: one setup,
run in-process or as a torchrun worker (``python -m torch.distributed.run ... trl_grpo.py OUT``).

tiny-random + LoRA on q/v, G = 4, ``loss_type="dr_grpo"``. ``keyed_rollout`` makes a row's
completion a function of its prompt, its index within its group and the step only, so a run on
two processes and a run on one draw the same global generation batch (TRL deals the sampler's
batches out to the processes in rank order, and gathers them back in that order).
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import torch
import torch.distributed as tdist

G = 4
TRAIN = ["What is 2 + 3?", "What is 7 - 4?", "What is 6 + 1?", "What is 9 - 8?",
         "What is 3 + 3?", "What is 8 - 6?", "What is 5 + 4?", "What is 7 - 7?"]  # fmt: skip
EVAL = ["What is 1 + 1?", "What is 5 - 2?", "What is 4 + 4?", "What is 8 - 3?"]
PROBES = [
    {"name": "delta_h", "kind": "delta_h", "options": {"batch_size": 4, "completions_per_prompt": 2}},
    {"name": "ess", "kind": "ess"},
    {"name": "gns", "kind": "gns"},
    {"name": "fisher", "kind": "fisher", "options": {"batch_size": 4}},
]
MAX_COMPLETION = 8


def token_sum_reward(prompts, completions, completion_ids, **kwargs):
    """Varies within every group (distinct sampled ids), so every group has signal."""
    return [float(sum(ids) % 7) for ids in completion_ids]


def keyed_rollout(prompts, trainer):
    """TRL's ``rollout_func``: row j of a prompt's group gets random non-special tokens (1 to
    MAX_COMPLETION of them) seeded by (prompt, j, step), whichever process generates it."""
    from rl_training.sampling import stable_seed

    tokenizer = trainer.processing_class
    seen: dict[str, int] = {}
    prompt_ids, completion_ids = [], []
    for prompt in prompts:
        j = seen[prompt] = seen.get(prompt, -1) + 1
        gen = torch.Generator().manual_seed(stable_seed("trl-rollout", prompt, j, trainer.state.global_step))
        n = int(torch.randint(1, MAX_COMPLETION + 1, (), generator=gen))
        prompt_ids.append(tokenizer(prompt, add_special_tokens=False).input_ids)
        completion_ids.append(torch.randint(3, len(tokenizer), (n,), generator=gen).tolist())
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}


def make_trainer(output_dir: Path, *, rows: int = 4, accum: int = 2, keyed: bool = False, train=TRAIN[:4], **overrides):
    """``rows`` a microbatch, ``accum`` microbatches a step, on each process."""
    import datasets
    import trl

    from rl_training.models import TINY_RANDOM, ModelSpec, apply_lora, load_tokenizer_and_model

    tokenizer, base = load_tokenizer_and_model(ModelSpec(TINY_RANDOM, seed=0))
    model = apply_lora(base, r=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "v_proj"], seed=0)
    settings = dict(
        output_dir=str(output_dir), use_cpu=True, report_to=[], bf16=False,
        loss_type="dr_grpo", scale_rewards="none", beta=0.0, max_completion_length=MAX_COMPLETION, num_generations=G,
        per_device_train_batch_size=rows, gradient_accumulation_steps=accum, temperature=1.0,
        learning_rate=1e-3, max_grad_norm=1e-3, max_steps=2, logging_steps=1, save_strategy="no", seed=0,
        gradient_checkpointing=False, use_vllm=False,
    )  # fmt: skip
    settings.update(overrides)
    return trl.GRPOTrainer(
        model=model, reward_funcs=token_sum_reward, args=trl.GRPOConfig(**settings), processing_class=tokenizer,
        train_dataset=datasets.Dataset.from_dict({"prompt": list(train)}), rollout_func=keyed_rollout if keyed else None,
    )  # fmt: skip


def train_keyed(output_dir: Path, *, rows: int, accum: int) -> dict:
    """Two probed TRL steps on ``keyed_rollout``'s completions; what this process logged, and its
    LoRA parameters after them."""
    from probes.trl_callback import ProbeCallback

    trainer = make_trainer(output_dir, rows=rows, accum=accum, keyed=True, train=TRAIN)
    ProbeCallback(trainer, PROBES, eval_prompts=EVAL, strict=True)
    trainer.train()
    logs = [row for row in trainer.state.log_history if "probe/gns/g2" in row]
    lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    return {"logs": logs, "lora": lora, "rank": trainer.accelerator.process_index}


def main(out: str, rows: str, accum: str) -> None:
    """torchrun worker: writes rank<r>.json (the logs) and rank<r>.pt (the LoRA parameters)."""
    import os

    os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"  # rollout_func is "experimental"
    result = train_keyed(Path(out) / "trl", rows=int(rows), accum=int(accum))
    rank = result["rank"]
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result["logs"]))
    torch.save(result["lora"], Path(out) / f"rank{rank}.pt")
    # The trainer (its DDP holds the process group), then the group, while Python is fully alive:
    # left to interpreter exit, gloo's threads can free the last collectives' tensors during the
    # teardown, which aborts (exit −6, "terminate called without an active exception"; seen once
    # in CI after both steps had run; pytorch/pytorch PR 179291 describes it).
    del result
    gc.collect()
    if tdist.is_initialized():
        tdist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
