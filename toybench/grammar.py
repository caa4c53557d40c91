"""Sentence grammar for the toy ASR task: a few hundred everyday words in a dozen templates.

The combinatorial space is far larger than any split, so a sentence rarely repeats, and the
split of a sentence is decided by hashing its text (see `toybench.splits`): a test sentence is
never heard in training, while its words come from the same few hundred.
"""

import re

import numpy as np

from toybench.splits import MAX_CONTENT_DRAWS, split_of

ADJECTIVES = (
    "red", "blue", "green", "yellow", "black", "white", "brown", "orange", "purple", "pink",
    "grey", "golden", "silver", "big", "small", "little", "tall", "short", "long", "old", "new",
    "young", "happy", "sad", "angry", "quiet", "noisy", "busy", "lazy", "clever", "funny", "gentle",
    "heavy", "light", "warm", "cold", "hot", "wet", "dry", "clean", "dirty", "empty", "full", "soft",
    "hard", "bright", "dark", "fast", "slow", "strange", "lovely", "tiny", "huge", "round", "sharp",
)

# Nouns whose plural follows the regular spelling rules in `plural`.
NOUNS = (
    "dog", "cat", "horse", "bird", "cow", "duck", "rabbit", "frog", "tiger", "lion",
    "monkey", "snake", "spider", "apple", "banana", "cake", "bread", "cheese", "egg", "orange",
    "lemon", "carrot", "potato", "tomato", "cookie", "sandwich", "box", "bag", "book", "pen",
    "pencil", "letter", "paper", "cup", "glass", "plate", "bottle", "spoon", "chair", "table", "bed",
    "lamp", "window", "door", "clock", "phone", "radio", "camera", "key", "coin", "ring", "hat",
    "coat", "shirt", "shoe", "sock", "glove", "ball", "kite", "boat", "car", "bus", "train", "truck",
    "bike", "plane", "rocket", "flower", "tree", "stone", "shell", "candle", "basket", "blanket",
    "pillow", "bucket", "ladder", "hammer", "brush", "mirror", "picture", "drum", "guitar", "piano",
    "bell", "whistle", "robot", "doll", "puzzle", "map", "ticket", "card", "garden", "cloud",
)

NAMES = (
    "anna", "ben", "clara", "david", "emma", "frank", "grace", "henry", "isabel", "jack", "kate",
    "leo", "maria", "nick", "olivia", "peter", "rachel", "sam", "sarah", "tom", "victor", "william",
    "zoe", "lucy", "mark", "paul", "helen", "oscar", "alice", "george",
)

PLACES = (
    "market", "station", "river", "library", "school", "park", "beach", "forest", "hospital",
    "museum", "office", "kitchen", "garden", "bridge", "harbour", "village", "city", "farm", "zoo",
    "bakery", "church", "castle", "airport", "hotel", "island", "mountain", "lake", "shop",
)

# (base, past) of transitive verbs; base forms follow "please" and "can you".
TRANSITIVE_VERBS = (
    ("carry", "carried"), ("find", "found"), ("buy", "bought"), ("sell", "sold"), ("bring", "brought"),
    ("take", "took"), ("move", "moved"), ("paint", "painted"), ("clean", "cleaned"), ("open", "opened"),
    ("close", "closed"), ("hide", "hid"), ("drop", "dropped"), ("catch", "caught"), ("throw", "threw"),
    ("push", "pushed"), ("pull", "pulled"), ("wash", "washed"), ("fix", "fixed"), ("hold", "held"),
    ("keep", "kept"), ("send", "sent"), ("draw", "drew"), ("cook", "cooked"), ("fold", "folded"),
    ("count", "counted"), ("watch", "watched"), ("follow", "followed"), ("kick", "kicked"),
    ("lift", "lifted"), ("borrow", "borrowed"), ("share", "shared"), ("check", "checked"),
    ("pack", "packed"), ("order", "ordered"), ("visit", "visited"), ("choose", "chose"),
)

# (past, present participle) of intransitive verbs.
INTRANSITIVE_VERBS = (
    ("waited", "waiting"), ("sang", "singing"), ("danced", "dancing"), ("laughed", "laughing"),
    ("slept", "sleeping"), ("jumped", "jumping"), ("played", "playing"), ("walked", "walking"),
    ("ran", "running"), ("swam", "swimming"), ("smiled", "smiling"), ("cried", "crying"),
    ("shouted", "shouting"), ("listened", "listening"), ("worked", "working"), ("rested", "resting"),
    ("talked", "talking"), ("climbed", "climbing"), ("whistled", "whistling"), ("sat", "sitting"),
    ("stood", "standing"), ("moved", "moving"), ("hummed", "humming"), ("waved", "waving"),
)

ADVERBS = (
    "quietly", "slowly", "quickly", "again", "carefully", "happily", "loudly", "softly", "early",
    "late", "together", "alone", "outside", "inside", "today", "tonight", "gently", "suddenly",
    "twice", "calmly",
)

NUMBERS = ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve")

TIMES = (
    "yesterday", "this morning", "last night", "on monday", "on tuesday", "on wednesday",
    "on thursday", "on friday", "on saturday", "on sunday", "after lunch", "before dinner",
    "every day", "last week", "in the evening",
)

PREPOSITIONS = (
    "near", "behind", "under", "beside", "inside", "above", "below", "next to", "in front of",
    "across", "around", "past",
)

# Each template is a sequence of slots (upper case) and literal words (lower case).
TEMPLATES = (
    "the ADJ NOUN PAST_T the NOUN",
    "NAME PAST_T NUM ADJ NOUNS",
    "TIME NAME walked to the ADJ PLACE",
    "the NOUN is ING_I PREP the ADJ NOUN",
    "please BASE_T the ADJ NOUN PREP the PLACE",
    "NAME and NAME PAST_T the NOUN TIME",
    "can you BASE_T NUM NOUNS ADV",
    "my NOUN is ADJ and your NOUN is ADJ",
    "NUM ADJ NOUNS were ING_I PREP the PLACE",
    "NAME PAST_I ADV",
    "we saw A_ADJ NOUN PREP the PLACE TIME",
    "NAME said the NOUN was too ADJ",
    "there are NUM NOUNS in the PLACE",
    "TIME the ADJ NOUN PAST_I ADV",
)


def plural(noun: str) -> str:
    """Regular English plural (the noun list avoids irregular ones)."""
    if re.search(r"(s|sh|ch|x)$", noun) or noun in ("potato", "tomato"):
        return noun + "es"
    if re.search(r"[^aeiou]y$", noun):
        return noun[:-1] + "ies"
    return noun + "s"


def with_article(word: str) -> str:
    """`word` preceded by "a" or "an"; the word lists hold no vowel-letter words sounding otherwise."""
    return ("an " if word[0] in "aeiou" else "a ") + word


def _slot_choices() -> dict[str, tuple[str, ...]]:
    return {
        "ADJ": ADJECTIVES,
        "A_ADJ": tuple(with_article(a) for a in ADJECTIVES),
        "NOUN": NOUNS,
        "NOUNS": tuple(plural(n) for n in NOUNS),
        "NAME": NAMES,
        "PLACE": PLACES,
        "BASE_T": tuple(v[0] for v in TRANSITIVE_VERBS),
        "PAST_T": tuple(v[1] for v in TRANSITIVE_VERBS),
        "PAST_I": tuple(v[0] for v in INTRANSITIVE_VERBS),
        "ING_I": tuple(v[1] for v in INTRANSITIVE_VERBS),
        "ADV": ADVERBS,
        "NUM": NUMBERS,
        "TIME": TIMES,
        "PREP": PREPOSITIONS,
    }


SLOT_CHOICES = _slot_choices()


def sample_sentence(rng: np.random.Generator) -> str:
    """One sentence: lowercase words separated by single spaces, no punctuation (the ASR target)."""
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    words = []
    for token in template.split():
        choices = SLOT_CHOICES.get(token)
        words.append(token if choices is None else choices[rng.integers(len(choices))])
    return " ".join(words)


def vocabulary() -> set[str]:
    """Every word a sentence can contain."""
    words = {token for template in TEMPLATES for token in template.split() if token not in SLOT_CHOICES}
    for choices in SLOT_CHOICES.values():
        for phrase in choices:
            words.update(phrase.split())
    return words


def sample_sentence_in_split(rng: np.random.Generator, split: str) -> str:
    """Draw sentences until one is owned by `split`, so no sentence is spoken in two splits."""
    for _ in range(MAX_CONTENT_DRAWS):
        sentence = sample_sentence(rng)
        if split_of("asr:" + sentence) == split:
            return sentence
    raise RuntimeError(f"no sentence for split {split!r} in {MAX_CONTENT_DRAWS} draws")
