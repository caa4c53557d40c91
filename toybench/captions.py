"""Caption grammar for the toy AAC task: paraphrased phrases for each event, joined by order templates.

Every caption names every event of its scene exactly once and states their order, either directly
("a high tone followed by three beeps") or reversed with an explicit marker ("three beeps come after
a high tone"). Each phrase carries a word that only that event's phrases use, so what a caption says
can be checked against the recipe.
"""

import numpy as np

from toybench.scenes import Event, Recipe

CAPTIONS_PER_CLIP = 5

_COUNT_WORDS = {"2": "two", "3": "three", "4": "four", "5": "five"}

# (phrase, is_plural) per event key; plurality picks the verb form in templates.
_PHRASES: dict[str, tuple[tuple[str, bool], ...]] = {
    "tone:low": (("a low tone", False), ("a low-pitched tone", False), ("a deep tone", False),
                 ("a low hum", False)),
    "tone:high": (("a high tone", False), ("a high-pitched tone", False), ("a shrill tone", False),
                  ("a sharp high tone", False)),
    "sweep:rising": (("a rising sweep", False), ("a tone that rises in pitch", False),
                     ("an upward sweep", False), ("a rising whistle", False)),
    "sweep:falling": (("a falling sweep", False), ("a tone that falls in pitch", False),
                      ("a downward sweep", False), ("a falling whistle", False)),
    "noise:white": (("white noise", False), ("a burst of white noise", False),
                    ("a hiss of white noise", False), ("hissing static", False)),
    "noise:pink": (("pink noise", False), ("a burst of pink noise", False),
                   ("a soft rushing noise", False), ("a rush of pink noise", False)),
    "noise:brown": (("brown noise", False), ("a burst of brown noise", False), ("a rumbling noise", False),
                    ("a rumble of brown noise", False)),
    "clicks:slow": (("slow clicks", True), ("a slow ticking", False), ("clicks at a slow pace", True),
                    ("a few slow clicks", True)),
    "clicks:fast": (("rapid clicks", True), ("fast clicking", False), ("a fast ticking", False),
                    ("quick clicks", True)),
    "siren": (("a siren", False), ("a wailing siren", False), ("an alarm siren", False),
              ("a yelping siren", False)),
    "babble": (("people talking", True), ("a murmur of voices", False), ("speech babble", False),
               ("a crowd of people chatting", False)),
}
for _attr, _word in _COUNT_WORDS.items():
    _PHRASES[f"beeps:{_attr}"] = ((f"{_word} short beeps", True), (f"{_word} beeps", True),
                                  (f"a series of {_word} beeps", False), (f"{_word} beeps in a row", True))

# Templates by number of events. {e<i>} is event i's phrase (in time order); {is<i>} and {s<i>} agree a
# verb with it ("is"/"are", "comes"/"come"). Reversed templates say "come(s) after", "follow(s)" or
# "preceded by", and only those do.
TEMPLATES: dict[int, tuple[str, ...]] = {
    1: (
        "{e0}",
        "{e0} {is0} heard",
        "you can hear {e0}",
        "the sound of {e0}",
        "{e0} can be heard",
        "a recording of {e0}",
    ),
    2: (
        "{e0} followed by {e1}",
        "{e0} and then {e1}",
        "first {e0}, then {e1}",
        "{e0} {is0} heard, then {e1}",
        "after {e0}, {e1} {is1} heard",
        "{e1} come{s1} after {e0}",
        "{e1} follow{s1} {e0}",
        "{e1}, preceded by {e0}",
    ),
    3: (
        "{e0}, then {e1}, then {e2}",
        "{e0} followed by {e1} and then {e2}",
        "first {e0}, then {e1}, and finally {e2}",
        "{e0} {is0} heard, followed by {e1} and {e2}",
        "after {e0} and {e1}, {e2} {is2} heard",
        "{e0}, {e1} and {e2}, in that order",
    ),
}

MAX_CAPTION_DRAWS = 500


def phrases(event: Event) -> tuple[tuple[str, bool], ...]:
    """The paraphrases (text, is_plural) that may name `event`."""
    return _PHRASES[event.key]


def render_caption(template: str, chosen: list[tuple[str, bool]]) -> str:
    """Fill a template with one chosen (phrase, is_plural) per event, in time order."""
    fields = {}
    for i, (text, is_plural) in enumerate(chosen):
        fields[f"e{i}"] = text
        fields[f"is{i}"] = "are" if is_plural else "is"
        fields[f"s{i}"] = "" if is_plural else "s"
    return template.format(**fields)


def sample_captions(recipe: Recipe, rng: np.random.Generator, n: int = CAPTIONS_PER_CLIP) -> list[str]:
    """`n` distinct captions of a scene, each a random template filled with random paraphrases."""
    templates = TEMPLATES[len(recipe)]
    captions: list[str] = []
    for _ in range(MAX_CAPTION_DRAWS):
        template = templates[rng.integers(len(templates))]
        chosen = [phrases(e)[rng.integers(len(phrases(e)))] for e in recipe]
        caption = render_caption(template, chosen)
        if caption not in captions:
            captions.append(caption)
            if len(captions) == n:
                return captions
    raise RuntimeError(f"could not draw {n} distinct captions in {MAX_CAPTION_DRAWS} tries")


def caption_vocabulary() -> set[str]:
    """Every word a caption can contain (commas stripped)."""
    words = set()
    for options in _PHRASES.values():
        for text, _ in options:
            words.update(text.split())
    for templates in TEMPLATES.values():
        for template in templates:
            for is_plural in (False, True):
                words.update(render_caption(template, [("", is_plural)] * 3).replace(",", " ").split())
    return words
