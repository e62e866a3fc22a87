"""The per-position stop sets agree with the sampler's own cut (completion_length)."""

import pytest

from rl_training import models
from rl_training.data.prompts import STOP_STRINGS
from rl_training.sampling import eos_token_ids
from rl_training.stops import StopRule, completion_length


@pytest.fixture(scope="module")
def tiny():
    tokenizer, model = models.load_tokenizer_and_model(models.ModelSpec("tiny-random"))
    eos = eos_token_ids(model, tokenizer)
    return tokenizer, eos, StopRule(tokenizer, eos, STOP_STRINGS)


@pytest.mark.parametrize("prefix_text", ["", "12 + 3 = 15", "<answer>15</", "<answer>15</answ", "15</answer", "x <"])
def test_stop_set_is_exactly_the_tokens_that_end_the_completion(tiny, prefix_text):
    tokenizer, eos, rule = tiny
    prefix = tokenizer(prefix_text, add_special_tokens=False)["input_ids"]
    assert completion_length(prefix, tokenizer, eos, STOP_STRINGS) == len(prefix), "the prefix must not stop"
    stops = set(rule.always) | set(rule.extra_ids(prefix))
    filler = tokenizer("9", add_special_tokens=False)["input_ids"]
    for v in range(len(tokenizer)):
        ends_here = completion_length(prefix + [v] + filler, tokenizer, eos, STOP_STRINGS) == len(prefix) + 1
        assert ends_here == (v in stops), (prefix_text, v, tokenizer.decode([v]))


def test_partial_stop_strings_have_completers(tiny):
    tokenizer, _, rule = tiny
    prefix = tokenizer("15</answer", add_special_tokens=False)["input_ids"]
    assert {tokenizer.decode([v]) for v in rule.extra_ids(prefix)} == {">", ">.", ">-"}


def test_stop_sets_tensor_layout(tiny):
    tokenizer, _, rule = tiny
    import torch

    a = tokenizer("<answer>1</answer", add_special_tokens=False)["input_ids"]
    a = a + tokenizer(">", add_special_tokens=False)["input_ids"]  # ends at a two-token stop
    b = tokenizer("no stop here", add_special_tokens=False)["input_ids"]
    width = max(len(a), len(b))
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    ids[0, : len(a)], mask[0, : len(a)] = torch.tensor(a), 1
    ids[1, : len(b)], mask[1, : len(b)] = torch.tensor(b), 1
    extra, extra_mask = rule.stop_sets(ids, mask)
    for i, row in enumerate((a, b)):
        for t in range(len(row)):
            got = sorted(extra[i, t][extra_mask[i, t]].tolist())
            assert got == rule.extra_ids(row[:t])
    assert extra_mask[0, len(a) - 1].any() and not extra_mask[1].any()
