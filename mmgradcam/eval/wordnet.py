"""WordNet for nltk without a download: Debian's wordnet-base files copied into a cache directory.

nltk refuses /usr/share/wordnet itself (and symlinks to it), and Debian's package lacks the
``lexnames`` file nltk needs, so the files are copied and lexnames written. Everything that uses
WordNet also works, more narrowly, without it (see words.py).
"""
from __future__ import annotations

import os
import shutil
from functools import lru_cache
from pathlib import Path

DEBIAN_WORDNET = Path("/usr/share/wordnet")
LEXNAMES = [
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute",
    "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group",
    "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant",
    "noun.possession", "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state",
    "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition", "verb.communication",
    "verb.competition", "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
]
_FILES = ["adj.exc", "adv.exc", "noun.exc", "verb.exc", "cntlist.rev", "data.adj", "data.adv", "data.noun",
          "data.verb", "index.adj", "index.adv", "index.noun", "index.sense", "index.verb"]


def lexnames_text() -> str:
    kinds = {"adj": 3, "adv": 4, "noun": 1, "verb": 2}
    return "".join(f"{i:02d}\t{name}\t{kinds[name.split('.')[0]]}\n" for i, name in enumerate(LEXNAMES))


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mmgradcam" / "nltk_data"


def install_from_debian(target: Path | None = None, source: Path = DEBIAN_WORDNET) -> Path | None:
    """Copy Debian's WordNet into ``target``/corpora/wordnet (with lexnames); None if absent."""
    if not (source / "data.noun").is_file():
        return None
    target = target or cache_dir()
    corpus = target / "corpora" / "wordnet"
    if not (corpus / "lexnames").is_file():
        tmp = corpus.with_name("wordnet.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name in _FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, tmp / name)
        (tmp / "lexnames").write_text(lexnames_text())
        shutil.rmtree(corpus, ignore_errors=True)
        tmp.rename(corpus)
    return target


@lru_cache(maxsize=1)
def wordnet():
    """nltk's WordNet reader, or None when no WordNet data can be found or installed."""
    if os.environ.get("MMGRADCAM_NO_WORDNET"):
        return None
    try:
        import nltk
        from nltk.corpus import wordnet as wn
    except ImportError:
        return None
    try:
        nltk.data.find("corpora/wordnet")
    except LookupError:
        try:
            target = install_from_debian()
        except OSError:
            target = None
        if target is None:
            return None
        if str(target) not in nltk.data.path:
            nltk.data.path.append(str(target))
    try:
        wn.ensure_loaded()
        wn.synsets("dog")
    except (LookupError, OSError):
        return None
    return wn
