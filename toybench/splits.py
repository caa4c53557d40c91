"""Split assignment and per-item random streams.

Content (a sentence, a scene recipe) is assigned to a split by a stable hash of its text, so the
same content can never land in two splits no matter which item drew it. Each item draws from its
own random stream derived from (seed, task, split, index), so the output does not depend on the
order in which worker processes pick up items.
"""

import hashlib

import numpy as np

SPLITS = ("train", "valid", "test")
TASKS = ("asr", "aac")

# Share of the content space (sentences, recipes) owned by each split, in thousandths.
_SPLIT_BOUNDS = (("train", 800), ("valid", 900), ("test", 1000))

# How many fresh draws an item may take to hit content owned by its split; each draw lands in the
# test share with probability 0.1, so failing this many times means the content space is broken.
MAX_CONTENT_DRAWS = 2000


def split_of(key: str) -> str:
    """The split that owns a piece of content, from the first 8 bytes of sha256(key)."""
    bucket = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % 1000
    for split, bound in _SPLIT_BOUNDS:
        if bucket < bound:
            return split
    raise AssertionError("unreachable: the last bound is 1000")


def item_rng(seed: int, task: str, split: str, index: int) -> np.random.Generator:
    """The random stream of one item; independent of every other item and of worker scheduling."""
    return np.random.default_rng([seed, TASKS.index(task), SPLITS.index(split), index])
