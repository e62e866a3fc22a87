"""Rewards for tests on tiny-random models. The one the tiny config uses ships in the
package (``data.reward: length_parity``); this name stays for dotted-path users."""

from rl_training.rewards import length_parity_reward as length_parity

__all__ = ["length_parity"]
