"""Caption quality on the shapes world: BLEU-4 and whether a caption names every object right."""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from mmgradcam.data.shapes import COLORS, NUMBER_WORDS, PLURALS, SHAPES
from mmgradcam.tasks.text import split_words

_SINGULAR = {plural: shape for shape, plural in PLURALS.items()} | {s: s for s in SHAPES}
_COUNTS = {"a": 1, "an": 1} | {word: n for n, word in NUMBER_WORDS.items()}


def mentioned_objects(caption: str) -> Counter:
    """The (color, shape) objects a caption names, with multiplicity: "two red circles and a
    blue star" -> {(red, circle): 2, (blue, star): 1}. A shape without a color counts as (None, shape)."""
    words = split_words(caption)
    found: Counter = Counter()
    for i, word in enumerate(words):
        if word not in _SINGULAR:
            continue
        color, count = None, 1
        for back in words[max(0, i - 3):i][::-1]:
            if back in COLORS and color is None:
                color = back
            elif back in _COUNTS:
                count = _COUNTS[back]
                break
        found[(color, _SINGULAR[word])] += count
    return found


def names_every_object(caption: str, objects: Sequence[tuple[str, str]]) -> bool:
    """True when the caption names exactly the image's objects, each with its color and shape."""
    return mentioned_objects(caption) == Counter(objects)


def names_every_shape(caption: str, objects: Sequence[tuple[str, str]]) -> bool:
    mentioned = Counter()
    for (_, shape), n in mentioned_objects(caption).items():
        mentioned[shape] += n
    return mentioned == Counter(shape for _, shape in objects)


def bleu4(references: Sequence[Sequence[str]], hypotheses: Sequence[str]) -> float:
    """Corpus BLEU-4 (nltk) of generated captions against each image's reference captions."""
    from nltk.translate.bleu_score import corpus_bleu

    refs = [[split_words(r) for r in image_refs] for image_refs in references]
    hyps = [split_words(h) for h in hypotheses]
    return float(corpus_bleu(refs, hyps))
