"""Text as a reader sees it: what the blocklist matches instead of the code points typed.

A prompt can spell a blocked word so that it looks the same on screen and differs in code
points: a Cyrillic "о" or a Greek omicron for the Latin "o", a zero-width space or a soft
hyphen inside the word, fullwidth or mathematical letters. `reader_form` undoes these, in
the order Unicode's security guidance (UTS #39) implies:

1. NFKC: compatibility forms to their plain letters (fullwidth "ｚ", "𝐳" -> "z");
2. default-ignorable code points removed (they render as nothing: U+200B, U+00AD, U+2060,
   variation selectors, tags, ...), before and after NFKC, which can produce some;
3. lowercase, then each character that Unicode's confusables table says looks like an ASCII
   character mapped to it ("о" Cyrillic, "ο" Greek -> "o"). The table is the one the
   `confusable-homoglyphs` package ships (Unicode's confusables.txt);
4. accents on Latin letters dropped ("ö" -> "o"); letters of other scripts are kept as they
   are, so a Cyrillic or CJK keyword matches Cyrillic or CJK text.
"""

from __future__ import annotations

import functools
import json
import unicodedata
from importlib import resources

# DerivedCoreProperties.txt, Default_Ignorable_Code_Point (stable since Unicode 5.1 but for
# additions inside these ranges, which are reserved for it).
DEFAULT_IGNORABLE_RANGES = (
    (0x00AD, 0x00AD), (0x034F, 0x034F), (0x061C, 0x061C), (0x115F, 0x1160), (0x17B4, 0x17B5),
    (0x180B, 0x180F), (0x200B, 0x200F), (0x202A, 0x202E), (0x2060, 0x206F), (0x3164, 0x3164),
    (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF), (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A), (0xE0000, 0xE0FFF),
)
_IGNORABLE = {code: None for low, high in DEFAULT_IGNORABLE_RANGES for code in range(low, high + 1)}


def _preference(target: str) -> int:
    """Which ASCII look-alike a character maps to when it has several: lowercase letters first."""
    return 0 if target.islower() else 1 if target.isupper() else 2


@functools.lru_cache(maxsize=1)
def _ascii_lookalikes() -> dict[int, str]:
    """Non-ASCII character -> the (lowercase) ASCII character Unicode lists it as confusable with."""
    table = json.loads(resources.files("confusable_homoglyphs").joinpath("confusables.json")
                       .read_text(encoding="utf-8"))
    mapping = {}
    for char, homoglyphs in table.items():
        if len(char) != 1 or char.isascii():
            continue
        targets = [h["c"] for h in homoglyphs if len(h["c"]) == 1 and h["c"].isascii() and h["c"].isprintable()
                   and not h["c"].isspace()]
        if char.isalpha():  # a letter reads as a letter ("б" is listed with "6": keep Cyrillic words words)
            targets = [t for t in targets if t.isalpha()]
        if targets:
            mapping[ord(char)] = min(targets, key=lambda t: (_preference(t), t)).lower()
    return mapping


def reader_form(text: str) -> str:
    """`text` lowercased as a reader sees it (see the module docstring)."""
    text = unicodedata.normalize("NFKC", text.translate(_IGNORABLE)).translate(_IGNORABLE)
    text = text.lower().translate(_ascii_lookalikes())
    out = []
    for char in unicodedata.normalize("NFKD", text):
        if unicodedata.combining(char) and out and out[-1].isascii():
            continue  # an accent on a Latin letter: "zörblax" reads as "zorblax"
        out.append(char)
    return "".join(out)
