"""Words -> things with masks: COCO categories (nouns) and, where annotations carry colors, colors.

A word is lemmatized (WordNet's morphy when WordNet is present, else suffix rules plus an
irregular-plural table), then looked up in the synonym table (a data file; a user file extends
it), with two-word names ("hot dog", "teddy bear") matched first. With WordNet, a noun missing
from the table maps to a category its first senses are hyponyms of ("puppy" -> dog).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
import re
from dataclasses import dataclass
from pathlib import Path

from .wordnet import wordnet

SYNONYMS_FILE = Path(__file__).with_name("synonyms.tsv")
COLOR_WORDS = ("red", "green", "blue", "yellow", "purple", "orange", "pink", "brown", "black", "white",
               "gray", "grey")
IRREGULAR_PLURALS = {
    "men": "man", "women": "woman", "children": "child", "people": "person", "mice": "mouse", "geese": "goose",
    "knives": "knife", "leaves": "leaf", "calves": "calf", "wolves": "wolf", "feet": "foot", "teeth": "tooth",
    "oxen": "ox", "sheep": "sheep", "fish": "fish", "deer": "deer", "cattle": "cattle", "scissors": "scissors",
    "skis": "ski", "buses": "bus", "glasses": "glass", "benches": "bench", "sandwiches": "sandwich",
    "ponies": "pony", "puppies": "puppy", "babies": "baby", "ladies": "lady", "kitties": "kitty",
    "skies": "sky", "boxes": "box", "dishes": "dish", "couches": "couch", "matches": "match", "bunches": "bunch",
    "toothbrushes": "toothbrush", "giraffes": "giraffe", "cacti": "cactus", "loaves": "loaf", "shelves": "shelf",
}
WORD_CLASSES = ("noun", "color", "function")
# A function word ("a", "and", "left", ...: any word that names no category or color) has no
# object of its own; it is scored against the union of every object's mask in the image.
FUNCTION_TARGET = "objects"
# Function words never go to WordNet (whose senses include "a" = vitamin A, "in" = inch ...).
FUNCTION_WORDS = frozenset("""a an the of in on at to with and or is are was were be been there here this that
these those it its his her their one two three four five some any each every by for from into onto near next
over under above below left right top bottom front back side middle center while has have had who which what
""".split())


def load_synonyms(extra: str | Path | None = None) -> dict[str, str]:
    """The packaged synonym table, extended/overridden by a user file of ``word<TAB>category`` lines."""
    table: dict[str, str] = {}
    for path in [SYNONYMS_FILE] + ([Path(extra)] if extra else []):
        for number, line in enumerate(Path(path).read_text().splitlines(), 1):
            line = line.split("#", 1)[0].rstrip()
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
                raise ValueError(f"{path}:{number}: expected 'word<TAB>category', got {line!r}")
            table[parts[0].strip().lower()] = parts[1].strip()
    return table


def singular(word: str, use_wordnet: bool = True) -> str:
    """The singular (lemma) of a noun."""
    word = word.lower()
    if word in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[word]
    wn = wordnet() if use_wordnet else None
    if wn is not None:
        lemma = wn.morphy(word, wn.NOUN)
        if lemma:
            return lemma
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith("ves"):
        return word[:-3] + "f"
    if len(word) > 3 and word.endswith(("ses", "xes", "zes", "ches", "shes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


@dataclass(frozen=True)
class MappedWord:
    index: int  # position in the word list (the head word of a two-word name)
    word: str
    word_class: str  # "noun", "color" or "function"
    target: str  # category name, color name, or FUNCTION_TARGET


class WordMapper:
    """Maps caption words to the categories (and colors) a data set has masks for."""

    def __init__(self, categories: Iterable[str], colors: Iterable[str] = (), synonyms: dict[str, str] | None = None,
                 use_wordnet: bool = True):
        self.categories = set(categories)
        self.colors = {c.lower() for c in colors}
        table = synonyms if synonyms is not None else load_synonyms()
        self.table = {w: c for w, c in table.items() if c in self.categories}
        for category in self.categories:  # every category names itself
            self.table.setdefault(category.lower(), category)
        self.use_wordnet = use_wordnet
        self._wordnet_categories = None
        self._known: dict[str, str | None] = {}  # word -> category: captions repeat words (and WordNet is slow)

    def _hypernym_category(self, lemma: str) -> str | None:
        wn = wordnet() if self.use_wordnet else None
        if wn is None:
            return None
        if self._wordnet_categories is None:
            self._wordnet_categories = {}
            for category in self.categories:
                senses = wn.synsets(category.replace(" ", "_"), wn.NOUN)
                if senses:
                    self._wordnet_categories[senses[0]] = category
        for sense in wn.synsets(lemma, wn.NOUN)[:2]:
            for path in sense.hypernym_paths():
                for ancestor in reversed(path):
                    if ancestor in self._wordnet_categories:
                        return self._wordnet_categories[ancestor]
        return None

    def category(self, word: str) -> str | None:
        """The category a word names, or None. WordNet (slow to load) is consulted only for words
        the table and the suffix rules cannot place."""
        word = word.lower()
        if word not in self._known:
            self._known[word] = self._find_category(word)
        return self._known[word]

    def _find_category(self, word: str) -> str | None:
        if word in self.table:
            return self.table[word]
        lemma = singular(word, use_wordnet=False)
        if lemma in self.table:
            return self.table[lemma]
        if word in self.colors or word in COLOR_WORDS or word in FUNCTION_WORDS or not lemma.isalpha():
            return None
        if not self.use_wordnet or wordnet() is None:
            return None
        lemma = singular(word, use_wordnet=True)
        if lemma in self.table:
            return self.table[lemma]
        return self._hypernym_category(lemma)

    def map(self, words: Sequence[str]) -> list[MappedWord]:
        """The mappable words of a caption, in order; two-word names are credited to their head word."""
        lowered = [w.lower() for w in words]
        mapped, used = [], set()
        for i in range(len(lowered) - 1):
            pair = f"{lowered[i]} {lowered[i + 1]}"
            if pair in self.table:
                mapped.append(MappedWord(i + 1, pair, "noun", self.table[pair]))
                used.update({i, i + 1})
        for i, word in enumerate(lowered):
            if i in used:
                continue
            if word in self.colors:
                mapped.append(MappedWord(i, word, "color", word))
                continue
            category = self.category(word)
            if category is not None:
                mapped.append(MappedWord(i, word, "noun", category))
        return sorted(mapped, key=lambda m: m.index)

    def classify(self, words: Sequence[str], function_words: bool = True) -> list[MappedWord]:
        """``map`` plus, with ``function_words``, every other word as a "function" word: words
        that map to no category or color and are not part of a two-word name; punctuation and
        special tokens ("<unk>") are not words."""
        mapped = self.map(words)
        if not function_words:
            return mapped
        covered = {m.index - k for m in mapped for k in range(len(m.word.split()))}
        extra = [MappedWord(i, w, "function", FUNCTION_TARGET) for i, w in enumerate(words)
                 if i not in covered and _WORD.fullmatch(w)]
        return sorted(mapped + extra, key=lambda m: m.index)


_WORD = re.compile(r"[^\W\d_][\w'-]*")
