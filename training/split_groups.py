"""Split units that keep near-duplicates on one side of the train/val split (issue 15).

- **Font family**: every face of one family (weights, widths, optical sizes, Sans/Serif/Mono of one
  superfamily) and its metric clones (Liberation <-> Arimo/Tinos/Cousine, the URW base-35 fonts
  <-> TeX Gyre <-> GNU FreeFont, Bitstream Vera <-> DejaVu, ...) form one group.
- **Base emoji**: the man/woman/person (boy/girl/child) variants of one emoji, its gender signs,
  hair-style components and variation selectors form one group; so do all families, couples, kisses.
"""

from __future__ import annotations

import re
from pathlib import Path

# metric-compatible clones, by design: the first word(s) of a normalised family name -> one key
CLONES = {
    "helvetica": ("liberation sans", "arimo", "nimbus sans", "tex gyre heros", "freesans", "helvetica"),
    "times": ("liberation serif", "tinos", "nimbus roman", "tex gyre termes", "freeserif", "times"),
    "courier": ("liberation mono", "cousine", "nimbus mono", "tex gyre cursor", "freemono", "courier"),
    "palatino": ("p052", "urw palladio", "tex gyre pagella", "palatino", "palladio"),
    "bookman": ("urw bookman", "tex gyre bonum", "bookman"),
    "century schoolbook": ("c059", "century schoolbook", "tex gyre schola"),
    "avant garde": ("urw gothic", "tex gyre adventor", "avant garde"),
    "zapf chancery": ("z003", "tex gyre chorus", "zapf chancery"),
    "dejavu": ("dejavu", "bitstream vera"),
    "calibri": ("carlito", "calibri"),
    "cambria": ("caladea", "cambria"),
    "computer modern": ("latin modern", "lm ", "cmu ", "computer modern"),
}
# superfamilies whose members share one design language: grouped by their first word
_STYLE = re.compile(
    r"\b(regular|bold|italic|oblique|light|thin|medium|black|heavy|semi\w*|demi\w*|extra\w*|ultra\w*|"
    r"condensed|narrow|expanded|book|display|text|caption|subhead|ui|\d+)\b",
    re.I,
)


def _words(name: str) -> str:
    name = re.sub(r"([a-z])([A-Z])", r"\1 \2", name)  # "DejaVuSans" -> "Deja Vu Sans" handled below
    return " ".join(name.replace("-", " ").replace("_", " ").lower().split())


def font_family(family: str, path: str | Path = "") -> str:
    """The split group of a font: its clone design, else its superfamily (the family name's first
    word once style words are removed; "Latin Modern", "TeX Gyre X" are clones above). ``family`` is
    the fontconfig family name (Pillow's ``font.getname()[0]``); the file name is the fallback."""
    raw = family or Path(path).stem
    for name in (" ".join(raw.lower().replace("-", " ").replace("_", " ").split()), _words(raw)):
        for key, members in CLONES.items():
            if any(
                name.startswith(m) or name.replace(" ", "").startswith(m.replace(" ", "")) for m in members
            ):
                return key
    words = _STYLE.sub(" ", raw.lower().replace("-", " ").replace("_", " ")).split()
    return words[0] if words else raw.lower()


_PERSON_WORDS = re.compile(r"\b(man|woman|person|men|women|people|boy|girl|child|adult)('s)?\b")
_MERGED = ("family", "couple with heart", "kiss", "holding hands")


def emoji_base(name: str) -> str:
    """The split group of an emoji from its emoji-test.txt name: gendered and person variants,
    hair styles and the people in families/couples collapse to one name.

    "man health worker", "woman health worker", "health worker" -> "health worker";
    "woman: red hair" -> "red hair"; "family: man, woman, boy" -> "family"; "man" -> "person".
    """
    text = name.lower()
    for merged in _MERGED:
        if merged in text:
            return merged
    text = _PERSON_WORDS.sub(" ", text)
    text = re.sub(r"[:,]", " ", text)
    return " ".join(text.split()) or "person"
