"""Where a completion ends, and which next tokens would end it.

The sampler cuts a completion at its first EOS token or right after the first occurrence of a
stop string in its decoded text (``completion_length``). The entropy probes need the same rule
seen from the other side: at position t of a completion, the set s_t of tokens that would end
it there (``StopRule.stop_sets``), so that the probability of stopping, P_S,t = Σ_{v∈s_t} π_t(v),
and its change can be computed at every position, not only where a stop was sampled.

Contract: s_t is a SUBSET of the tokens that end the completion at t. An estimator that treats a
stop token outside s_t as an ordinary token with no future stays unbiased (it only loses the
variance reduction); a token inside s_t that does not stop would bias it. Hence every member
is either an EOS id, a token whose own text contains a whole stop string, or a token that
completes a stop string pending at the end of the prefix, checked by decoding in context.
"""

from __future__ import annotations

import torch


def completion_length(ids: list[int], tokenizer, eos_ids: set[int], stop_strings: tuple[str, ...]) -> int:
    """Tokens that belong to the completion: up to the first EOS or the end of a stop string."""
    end = len(ids)
    for i, tok in enumerate(ids):
        if tok in eos_ids:
            end = i + 1
            break
    if not stop_strings:
        return end

    def has_stop(k: int) -> bool:
        text = tokenizer.decode(ids[:k], skip_special_tokens=False)
        return any(s in text for s in stop_strings)

    if not has_stop(end):
        return end
    lo, hi = 1, end  # smallest k with has_stop(k); monotone in k
    while lo < hi:
        mid = (lo + hi) // 2
        if has_stop(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


class StopRule:
    """Per-position stop sets of completions under the sampler's rule.

    ``always``: EOS ids and tokens whose text contains a whole stop string (they stop anywhere).
    ``completers[p]``: tokens whose text starts with the rest of a stop string once the prefix's
    text ends with its proper prefix ``p``; verified in context before use.
    """

    def __init__(self, tokenizer, eos_ids: set[int], stop_strings: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop_strings = tuple(s for s in stop_strings if s)
        texts = tokenizer.batch_decode([[v] for v in range(len(tokenizer))], skip_special_tokens=False)
        whole = {v for v, t in enumerate(texts) if any(s in t for s in self.stop_strings)}
        self.always = sorted(set(eos_ids) | whole)
        self.completers: dict[str, list[int]] = {}
        for s in self.stop_strings:
            for j in range(1, len(s)):
                rest = s[j:]
                ids = [v for v, t in enumerate(texts) if t.startswith(rest) and v not in whole]
                if ids:
                    self.completers.setdefault(s[:j], []).extend(ids)
        # Enough trailing tokens to hold the longest pending prefix (every token decodes to ≥ 1
        # character; two more absorb decoding artefacts at the window's start).
        self.window = max((len(s) for s in self.stop_strings), default=0) + 2

    def extra_ids(self, prefix: list[int]) -> list[int]:
        """Tokens beyond ``always`` that end the completion right after ``prefix``."""
        if not self.completers:
            return []
        tail_ids = prefix[-self.window :]
        tail = self.tokenizer.decode(tail_ids, skip_special_tokens=False)
        found = []
        for pending, ids in self.completers.items():
            if not tail.endswith(pending):
                continue
            for v in ids:
                text = self.tokenizer.decode(tail_ids + [v], skip_special_tokens=False)
                if any(s in text for s in self.stop_strings):
                    found.append(v)
        return sorted(set(found))

    def stop_sets(self, completion_ids: torch.Tensor, completion_mask: torch.Tensor):
        """Per-position extra stop ids of right-padded completions [B, L].

        Returns (extra [B, L, K] int64, padded with 0; extra_mask [B, L, K] bool). Together with
        ``always`` they are s_t at every real position t (given the completion's own prefix).
        """
        B, L = completion_ids.shape
        rows: list[list[list[int]]] = []
        for i in range(B):
            n = int(completion_mask[i].sum())
            ids = completion_ids[i, :n].tolist()
            rows.append([self.extra_ids(ids[:t]) for t in range(n)])
        K = max((len(s) for r in rows for s in r), default=0)
        extra = torch.zeros(B, L, max(K, 1), dtype=torch.long)
        extra_mask = torch.zeros(B, L, max(K, 1), dtype=torch.bool)
        for i, r in enumerate(rows):
            for t, s in enumerate(r):
                if s:
                    extra[i, t, : len(s)] = torch.tensor(s)
                    extra_mask[i, t, : len(s)] = True
        return extra, extra_mask
