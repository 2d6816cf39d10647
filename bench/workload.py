"""The standard mixed-length workload (docs: shared reference `measurements.md`).

Sequence lengths in tokens, `<s>` and `</s>` included: `round(exp(N(ln 30, 0.7))) + 2`, clamped to
[4, 512], drawn from numpy's `default_rng(seed)` (seed 0 is the standard mix): mean about 40,
median 32, p99 about 160, a few at 512. "Useful tokens" are the real tokens; padding never counts.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import numpy as np

MEDIAN = 30
SIGMA = 0.7
MIN_LEN = 4
MAX_LEN = 512
# Ordinary token ids of the RoBERTa dictionary: after <s> <pad> </s> <unk>, before the three
# madeupword fillers (50261-50263) and <mask> (50264).
FIRST_NORMAL_ID = 4
LAST_NORMAL_ID = 50260
BOS, EOS = 0, 2


def standard_lengths(n: int, seed: int = 0) -> list[int]:
    """`n` sequence lengths of the standard mix."""
    rng = np.random.default_rng(seed)
    raw = np.rint(np.exp(rng.normal(math.log(MEDIAN), SIGMA, size=n))) + 2
    return np.clip(raw, MIN_LEN, MAX_LEN).astype(np.int64).tolist()


def random_token_seqs(lengths: Sequence[int], seed: int = 0) -> list[list[int]]:
    """One id list per length: `<s>`, random ordinary tokens, `</s>` (length 1: just `<s>`)."""
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        body = rng.integers(FIRST_NORMAL_ID, LAST_NORMAL_ID + 1, size=max(n - 2, 0)).tolist()
        out.append(([BOS, *body, EOS])[:n])
    return out


def length_sorted_batches(lengths: Sequence[int], budget: int = 2048) -> list[list[int]]:
    """Indices of the sequences grouped shortest first, each group at most `budget` tokens once
    padded to its longest sequence (a sequence longer than the budget gets a group of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # Sorted ascending: the newcomer is the longest of the group.
        if current and (len(current) + 1) * lengths[i] > budget:
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    return groups


def describe(lengths: Sequence[int]) -> dict[str, float]:
    """Summary statistics of a set of lengths (for logs and result files)."""
    arr = np.asarray(lengths)
    return {
        "n": int(arr.size),
        "tokens": int(arr.sum()),
        "mean": float(arr.mean()),
        "median": float(np.median(arr)),
        "p99": float(np.percentile(arr, 99)),
        "max": int(arr.max()),
    }


def single_token_words(tokenizer: Any, limit: int = 3000) -> list[str]:
    """Lower-case words that are one BPE token both at the start of a text and after a space, so
    that a text of n - 2 of them encodes to exactly n tokens."""
    words = []
    for token in tokenizer.convert_ids_to_tokens(range(tokenizer.vocab_size)):
        word = token[1:]
        if not (token.startswith("\u0120") and word.isascii() and word.isalpha()):
            continue
        if not (word.islower() and 2 <= len(word) <= 10):
            continue
        if len(tokenizer.encode(word)) == 3 and len(tokenizer.encode(" " + word)) == 3:
            words.append(word)
            if len(words) >= limit:
                break
    return words


def texts_of_lengths(words: Sequence[str], lengths: Sequence[int], seed: int = 0) -> list[str]:
    """One text per length, of random `single_token_words`, that encodes to exactly that length."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(n - 2)) for n in lengths]
