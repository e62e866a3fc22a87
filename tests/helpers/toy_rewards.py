"""Rewards for tests on tiny-random models, which never answer arithmetic correctly."""

from rl_training.rewards import RewardBreakdown


def length_parity(completion: str, gold) -> RewardBreakdown:
    """1 when the completion has an even number of characters: about half of the samples,
    so tiny-random groups have reward variance and the loss has a gradient."""
    ok = len(completion) % 2 == 0
    return RewardBreakdown(format_ok=True, answer_ok=ok, parsed=str(len(completion)), reward=float(ok))
