"""Whole-word text handling for the default models (HF families bring their own tokenizers)."""
from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Sequence

# Unicode letters and digits make words ("zürich", "café"); any other visible character is a mark.
WORD_PATTERN = re.compile(r"[^\W_]+(?:'[^\W_]+)?|[^\w\s]|_")
PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)


def split_words(text: str) -> list[str]:
    """Lower-cased words and punctuation marks, in order: "A red circle, two stars?" ->
    ['a', 'red', 'circle', ',', 'two', 'stars', '?']."""
    if not isinstance(text, str):
        raise TypeError(f"expected text (str), got {type(text).__name__}")
    return WORD_PATTERN.findall(text.lower())


def is_word(token: str) -> bool:
    """True for words (explained), False for punctuation (kept in the sequence, not explained)."""
    return any(ch.isalnum() for ch in token)


class Vocabulary:
    """A whole-word vocabulary with the four special tokens first."""

    def __init__(self, words: Sequence[str]):
        words = list(words)
        if tuple(words[:4]) != SPECIALS:
            words = list(SPECIALS) + [w for w in words if w not in SPECIALS]
        self.words = words
        self.index = {w: i for i, w in enumerate(words)}

    @classmethod
    def build(cls, texts: Iterable[str]) -> "Vocabulary":
        found = sorted({w for text in texts for w in split_words(text)})
        return cls(list(SPECIALS) + found)

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: str) -> bool:
        return word in self.index

    @property
    def pad_id(self) -> int:
        return self.index[PAD]

    @property
    def bos_id(self) -> int:
        return self.index[BOS]

    @property
    def eos_id(self) -> int:
        return self.index[EOS]

    @property
    def unk_id(self) -> int:
        return self.index[UNK]

    def encode(self, words: Sequence[str], what: str = "text", unknown: str = "error") -> list[int]:
        """Word ids. Unknown words raise a clear error (``unknown="error"``), become <unk> with a
        warning listing them (``unknown="warn"``) or silently (``unknown="ignore"``)."""
        missing = [w for w in words if w not in self.index]
        if missing and unknown != "ignore":
            if unknown == "error":
                raise ValueError(
                    f"{what} has words the model's vocabulary lacks: {', '.join(repr(w) for w in dict.fromkeys(missing))}. "
                    f"Known words include: {', '.join(w for w in self.words[4:40])} ..."
                )
            warnings.warn(f"{what}: unknown words mapped to {UNK}: {', '.join(dict.fromkeys(missing))}", stacklevel=3)
        return [self.index.get(w, self.unk_id) for w in words]

    def decode(self, ids: Iterable[int]) -> list[str]:
        out = []
        for i in ids:
            word = self.words[int(i)]
            if word == EOS:
                break
            if word not in SPECIALS:
                out.append(word)
        return out


def join_words(words: Sequence[str]) -> str:
    """Words back to a caption: punctuation attached to the word before it."""
    text = ""
    for word in words:
        text += word if (not is_word(word) and text) else (" " + word if text else word)
    return text
