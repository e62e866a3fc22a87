import torch

from rl_training.sampling import RowSampler, stable_seed
from rl_training.stops import completion_length


def test_stable_seed_is_deterministic_and_distinct():
    assert stable_seed(0, "rollout", 3, "abc", 1) == stable_seed(0, "rollout", 3, "abc", 1)
    assert stable_seed(0, "rollout", 3, "abc", 1) != stable_seed(0, "rollout", 3, "abc", 2)
    assert 0 <= stable_seed("x") < 2**63


def test_row_sampler_samples_softmax_at_temperature():
    # Frequencies of the chosen tokens match softmax(logits/T) within 4 sigma.
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    T, n = 0.7, 20000
    sampler = RowSampler([stable_seed("sampler-test")], temperature=T)
    draws = torch.stack([sampler(None, logits).argmax(dim=-1)[0] for _ in range(n)])
    freq = torch.bincount(draws, minlength=5).double() / n
    p = torch.softmax(logits[0].double() / T, dim=-1)
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
