"""The R1-style prompt template.

Every prompt ends with "<think>", so a completion starts inside the reasoning block and
should end with "</think> <answer> N </answer>"; generation stops at ``STOP_STRINGS``.
"""

from __future__ import annotations

from typing import Any

SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think> <answer> answer here </answer>."
)
ANSWER_INSTRUCTION = "Give the final number inside <answer> </answer>."
THINK_OPEN = "<think>"
STOP_STRINGS = ("</answer>",)


def user_message(question: str) -> str:
    """The user turn: the question, then the one-line answer instruction."""
    return f"{question.strip()}\n{ANSWER_INSTRUCTION}"


def _chat_prompt(tokenizer: Any, question: str) -> str:
    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": user_message(question)},
    ]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:
        # Some templates (e.g. Gemma's) reject a system role; fold it into the user turn.
        merged = [{"role": "user", "content": f"{SYSTEM_PROMPT}\n\n{user_message(question)}"}]
        text = tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)
    # Reasoning templates (DeepSeek-R1 distills, Qwen3) already open the think block.
    stripped = text.rstrip()
    return stripped if stripped.endswith(THINK_OPEN) else text + THINK_OPEN


def build_prompt(question: str, tokenizer: Any = None, use_chat_template: bool = True) -> str:
    """The prompt text for ``question``; always ends with "<think>".

    Uses the tokenizer's chat template when it has one and ``use_chat_template`` is set,
    otherwise a plain "System/User/Assistant" transcript.
    """
    if tokenizer is not None and use_chat_template and getattr(tokenizer, "chat_template", None):
        return _chat_prompt(tokenizer, question)
    return f"{SYSTEM_PROMPT}\nUser: {user_message(question)}\nAssistant: {THINK_OPEN}"


def render_completion(reasoning: str, answer: str) -> str:
    """What an ideal completion looks like after the prompt (used by tests)."""
    return f" {reasoning} </think> <answer> {answer} </answer>"
