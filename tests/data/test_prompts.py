import pytest

from rl_training.data.prompts import (
    STOP_STRINGS,
    SYSTEM_PROMPT,
    build_prompt,
    render_completion,
)
from rl_training.rewards import strict_reward


class ChatTokenizer:
    """Minimal stand-in for a HF tokenizer with a chat template."""

    chat_template = "fake"

    def __init__(self, suffix="<|im_start|>assistant\n", reject_system=False):
        self.suffix, self.reject_system, self.calls = suffix, reject_system, []

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert tokenize is False and add_generation_prompt is True
        self.calls.append(messages)
        if self.reject_system and any(m["role"] == "system" for m in messages):
            raise ValueError("System role not supported")
        body = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return body + self.suffix


def test_plain_prompt_ends_with_think():
    prompt = build_prompt("What is 2 + 3?")
    assert prompt.startswith(SYSTEM_PROMPT)
    assert "User: What is 2 + 3?\n" in prompt and "<answer> </answer>" in prompt
    assert prompt.endswith("Assistant: <think>")


def test_no_chat_template_or_disabled_falls_back_to_plain():
    class NoTemplate:
        chat_template = None

    assert build_prompt("q", NoTemplate()) == build_prompt("q")
    assert build_prompt("q", ChatTokenizer(), use_chat_template=False) == build_prompt("q")


def test_chat_template_prompt():
    tok = ChatTokenizer()
    prompt = build_prompt("What is 2 + 3?", tok)
    (messages,) = tok.calls
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"] == SYSTEM_PROMPT and messages[1]["content"].startswith(
        "What is 2 + 3?\n"
    )
    assert prompt.endswith("<|im_start|>assistant\n<think>")


def test_template_that_already_opens_think_is_not_doubled():
    prompt = build_prompt("q", ChatTokenizer(suffix="<｜Assistant｜><think>\n"))
    assert (
        prompt.endswith("<｜Assistant｜><think>")
        and prompt.count("<think>") == SYSTEM_PROMPT.count("<think>") + 1
    )


def test_template_without_system_role_gets_it_in_the_user_turn():
    tok = ChatTokenizer(reject_system=True)
    prompt = build_prompt("q", tok)
    assert [m["role"] for m in tok.calls[-1]] == ["user"]
    assert tok.calls[-1][0]["content"].startswith(SYSTEM_PROMPT)
    assert prompt.endswith("<think>")


def test_ideal_completion_scores_and_stops_at_stop_string():
    completion = render_completion("2 plus 3 is 5", "5")
    assert completion == " 2 plus 3 is 5 </think> <answer> 5 </answer>"
    assert completion.endswith(STOP_STRINGS[0])
    assert strict_reward(completion, "5").reward == 1.0


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_real_hf_tokenizer_chat_template():
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend)
    tok.chat_template = CHATML
    prompt = build_prompt("What is 2 + 3?", tok)
    assert prompt.startswith(
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?\n"
    )
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n<think>")
