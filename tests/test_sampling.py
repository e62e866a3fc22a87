import torch
from transformers.generation.stopping_criteria import StopStringCriteria

from rl_training import policy
from rl_training.models import TINY_RANDOM, ModelSpec, load_tokenizer_and_model
from rl_training.sampling import RowSampler, sample, stable_seed
from rl_training.stops import completion_length


def test_stable_seed_is_deterministic_and_distinct():
    assert stable_seed(0, "rollout", 3, "abc", 1) == stable_seed(0, "rollout", 3, "abc", 1)
    assert stable_seed(0, "rollout", 3, "abc", 1) != stable_seed(0, "rollout", 3, "abc", 2)
    assert 0 <= stable_seed("x") < 2**63


def test_row_sampler_samples_softmax_at_temperature():
    # Frequencies of the chosen tokens match softmax(logits/T) within 4 sigma: over 20,000 rows
    # at one position, and over 2,000 positions of one row.
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    T = 0.7
    p = torch.softmax(logits[0].double() / T, dim=-1)
    rows = RowSampler([stable_seed("sampler-test", r) for r in range(20000)], temperature=T)
    one = RowSampler([stable_seed("sampler-test")], temperature=T)
    for draws in (rows(None, logits.expand(20000, -1)).argmax(dim=-1),
                  torch.cat([one(None, logits).argmax(dim=-1) for _ in range(2000)])):
        n = len(draws)
        freq = torch.bincount(draws, minlength=5).double() / n
        sigma = (p * (1 - p) / n).sqrt()
        assert ((freq - p).abs() < 4 * sigma + 1e-12).all(), (freq, p)


def test_rows_depend_only_on_their_own_seed():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    a = RowSampler([11, 22, 33], 1.0)(None, logits).argmax(-1)
    b = RowSampler([22], 1.0)(None, logits[1:2]).argmax(-1)
    assert a[1] == b[0]


class _CharTok:
    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids)


def test_completion_length_stops_at_eos_or_end_of_stop_string():
    tok = _CharTok()
    ids = [ord(c) for c in "ab</answer>cd"]
    assert completion_length(ids, tok, eos_ids={0}, stop_strings=("</answer>",)) == len("ab</answer>")
    assert completion_length(ids + [0], tok, eos_ids={ord("b")}, stop_strings=("</answer>",)) == 2
    assert completion_length(ids, tok, eos_ids=set(), stop_strings=()) == len(ids)


def test_sampled_logps_are_the_policy_at_the_sampled_tokens():
    # The sampler's log π_T of each token equals the full forward's at the same position:
    # aligned (no off-by-one) and the same policy, up to float rounding of the KV-cache decode.
    tokenizer, model = load_tokenizer_and_model(ModelSpec(TINY_RANDOM, seed=0))
    prompts = ["What is 2 + 3?", "Count to three:", "x"]
    comps = sample(model, tokenizer, prompts, [1, 2, 3], max_new_tokens=12, temperature=0.7,
                   stop_strings=(), max_prompt_tokens=64)
    tokens = policy.TokenBatch(comps.prompt_ids, comps.prompt_mask, comps.completion_ids, comps.completion_mask)
    full, _ = policy.score(model, tokens, 0.7, 8)
    mask = comps.completion_mask.bool()
    assert mask.sum() > 10
    assert float((full - comps.logp).abs()[mask].max()) < 1e-4
    assert bool((comps.logp[~mask] == 0).all())


def test_stop_strings_end_the_decode_and_their_matcher_is_built_once(monkeypatch):
    """A stop string that most tokens hold ("e"): the decode ends when every row has met it,
    not at max_new_tokens, and the completions end there; HF's matcher is built once for the
    tokenizer, not at each call (building it walks the whole vocabulary)."""
    import rl_training.sampling as sampling

    tokenizer, model = load_tokenizer_and_model(ModelSpec(TINY_RANDOM, seed=0))
    built = []
    monkeypatch.setattr(sampling, "StopStringCriteria", lambda tok, stops: built.append(stops) or
                        StopStringCriteria(tok, stops))
    forwards = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    prompts, seeds = ["What is 2 + 3?", "Count to three:", "x"], [1, 2, 3]
    settings = dict(max_new_tokens=40, temperature=1.0, stop_strings=("e",), max_prompt_tokens=64)
    comps = sample(model, tokenizer, prompts, seeds, **settings)
    lengths = comps.completion_mask.sum(1).tolist()
    for ids, n in zip(comps.completion_ids.tolist(), lengths):  # the first "e" is in the last token
        assert "e" in tokenizer.decode(ids[:n]) and "e" not in tokenizer.decode(ids[: n - 1])
    assert max(lengths) < 40 and len(forwards) == max(lengths), (lengths, len(forwards))
    again = sample(model, tokenizer, prompts, seeds, **settings)
    assert torch.equal(again.completion_ids, comps.completion_ids)
    assert built == [["e"]], "one matcher for the tokenizer and its stop strings"
