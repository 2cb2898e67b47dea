"""The keyword blocklist: the first text guardrail, run before the guard LLM (as upstream does).

A prompt is refused when one of its words (or runs of words) is a blocklisted keyword, matched
as a whole word, case-insensitively, after undoing the trivial disguises:

- plurals and inflections: "Zorblaxes", "zorblaxing" and "zorblaxed" all reduce to "zorblax";
- separators inside a word: "zor-blax", "zor.blax", "z_o_r_b_l_a_x";
- letters spaced apart: "z o r b l a x";
- leetspeak: "z0rbl4x", "$orblax";
- accents and other non-ASCII look-alikes: "zörblax".

Whole words only: the keyword "ass" does not fire on "class" or "assemble". Optionally, words
of at least `fuzzy_min_chars` letters also match with one typo (`max_typos=1`).

The list is data. Its layout is the upstream checkpoint's `blocklist/` folder (the Cosmos
guardrail checkpoint on the Hugging Face Hub, nvidia/Cosmos-Guardrail1): text files of one
keyword or phrase per line, in `custom/` (matched with the normalisations above),
`exact_match/` (matched as written, whole words, case-insensitive) and `whitelist/` (words that
never match). A single text file works too (all of it `custom`). Lines starting with `#` and
blank lines are ignored. Replace or extend the files to change what is blocked.
"""

from __future__ import annotations

import logging
import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from ..modeling.folder import contained_path, read_file_below, write_file_below

logger = logging.getLogger(__name__)

KEYWORD_KINDS = ("custom", "exact_match", "whitelist")
MAX_LIST_FILE_BYTES = 16 * 1024 * 1024   # a keyword list is text; anything larger is not one
LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "@": "a", "$": "s",
                      "!": "i", "|": "l", "+": "t"})
# Characters that may sit inside a disguised word ("zor-blax", "z.o.r.b"), removed before matching.
INNER_SEPARATORS = re.compile(r"[-_.*'`~^:;,/\\]+")
WORD = re.compile(r"[a-z]+")
SENTENCE_PUNCTUATION = "!?.,;:()[]{}\"'"


def to_ascii(text: str) -> str:
    """Accents stripped ("ö" -> "o"), other non-ASCII characters replaced by spaces."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c if c.isascii() else (" " if not unicodedata.combining(c) else "") for c in decomposed)


def word_forms(word: str) -> set[str]:
    """The word and its candidate stems: plural and inflection suffixes removed (a light lemmatiser
    that over-generates on purpose: a candidate only matters if it is a blocklisted keyword)."""
    forms = {word}
    # Plurals and verb inflections only: "-er" / "-ness" make other words ("corner" is not "corn").
    rules = (("ies", "y"), ("ves", "f"), ("es", ""), ("s", ""), ("ing", ""), ("ing", "e"), ("ed", ""), ("ed", "e"))
    for suffix, replacement in rules:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            stem = word[: len(word) - len(suffix)] + replacement
            forms.add(stem)
            if len(stem) >= 4 and stem[-1] == stem[-2]:  # "zorblaxxing" / "stopped" -> doubled consonant
                forms.add(stem[:-1])
    return forms


def normalized_words(text: str) -> tuple[list[str], list[str]]:
    """The prompt as lowercase ASCII words (leetspeak undone, split at separators), and the extra
    whole-word readings of disguised words: "zor-blax" and "z o r b l a x" read as "zorblax"."""
    words, extras = [], []
    for chunk in to_ascii(text).lower().split():
        # Sentence punctuation around a word is not leetspeak ("Z0RBL4X!" ends a sentence).
        chunk = chunk.strip(SENTENCE_PUNCTUATION)
        parts = WORD.findall(chunk.translate(LEET))
        words += parts
        if len(parts) > 1 and INNER_SEPARATORS.search(chunk):
            extras.append("".join(parts))
    run = []
    for w in words + [""]:
        if len(w) == 1:
            run.append(w)
            continue
        if len(run) >= 3:
            extras.append("".join(run))
        run = []
    return words, extras


def _edit_distance_at_most_one(a: str, b: str) -> bool:
    if abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        return sum(x != y for x, y in zip(a, b)) <= 1
    short, long = (a, b) if len(a) < len(b) else (b, a)
    for i in range(len(long)):
        if long[:i] + long[i + 1:] == short:
            return True
    return False


def read_keyword_file(path: str | os.PathLike, within: str | os.PathLike | None = None) -> list[str]:
    """Keywords of one text file: one per line, `#` comments and blank lines skipped. Read without
    following a link out of `within` (default: the file's folder), at most MAX_LIST_FILE_BYTES read."""
    path = Path(path)
    within = Path(within) if within is not None else path.parent
    data = read_file_below(within, os.path.relpath(path, within), MAX_LIST_FILE_BYTES, what="keyword list")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not a UTF-8 text file of keywords ({err})") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _read_keyword_folder(folder: Path, within: Path) -> list[str]:
    real = contained_path(within, os.path.relpath(folder, within))   # a link out of `within` is refused
    if not real.is_dir():
        return []
    keywords = []
    for path in sorted(real.iterdir()):
        # Files only, none hidden; each read without following a link out of `within`.
        if not path.name.startswith(".") and not path.is_dir():
            keywords += read_keyword_file(folder / path.name, within)
    return keywords


@dataclass(frozen=True)
class BlocklistMatch:
    keyword: str        # the blocklisted keyword as listed
    found: str          # the words of the prompt that matched, as normalised


@dataclass
class Blocklist:
    """Keyword guardrail. `is_safe(prompt)` -> (safe, message), as the upstream guardrails answer."""

    custom: list[str] = field(default_factory=list)
    exact_match: list[str] = field(default_factory=list)
    whitelist: list[str] = field(default_factory=list)
    max_typos: int = 0             # 1: words of >= fuzzy_min_chars letters also match with one typo
    fuzzy_min_chars: int = 6

    name = "Blocklist"

    def __post_init__(self):
        if self.max_typos not in (0, 1):
            raise ValueError(f"max_typos must be 0 or 1; got {self.max_typos!r}")
        for kind in KEYWORD_KINDS:
            words = getattr(self, kind)
            if isinstance(words, str) or not all(isinstance(w, str) for w in words):
                raise TypeError(f"Blocklist {kind} must be a list of strings; got {words!r}")
        self._whitelisted = {w for entry in self.whitelist for w in normalized_words(entry)[0]}
        # Each keyword as the tuple of words it must match.
        self._phrases = [(entry, tuple(normalized_words(entry)[0])) for entry in self.custom]
        self._phrases = [(entry, words) for entry, words in self._phrases if words]
        self._exact = [(entry, tuple(to_ascii(entry).lower().split())) for entry in self.exact_match if entry.split()]

    @classmethod
    def from_path(cls, path: str | os.PathLike, within: str | os.PathLike | None = None, **options) -> Blocklist:
        """Load the keyword lists from the upstream `blocklist/` folder layout, or from one text file.
        Nothing is read through a link out of `within` (default: `path` itself, or its folder for a file):
        a checkpoint's blocklist never reads `/proc/self/environ` or `~/.ssh` through a planted link."""
        path = Path(path)
        within = Path(within) if within is not None else (path if path.is_dir() else path.parent)
        if contained_path(within, os.path.relpath(path, within)).is_file():
            return cls(custom=read_keyword_file(path, within), **options)
        if not path.is_dir():
            raise ValueError(f"blocklist {path} does not exist: pass a folder with {'/, '.join(KEYWORD_KINDS)}/ "
                             "subfolders of keyword files, or one text file of keywords")
        lists = {kind: _read_keyword_folder(path / kind, within) for kind in KEYWORD_KINDS}
        if not any(lists.values()) and not any((path / kind).is_dir() for kind in KEYWORD_KINDS):
            raise ValueError(f"blocklist folder {path} has none of the subfolders {', '.join(KEYWORD_KINDS)}")
        blocklist = cls(**lists, **options)
        logger.info("Blocklist: %d keywords, %d exact-match keywords, %d whitelisted words from %s",
                    len(blocklist.custom), len(blocklist.exact_match), len(blocklist.whitelist), path)
        return blocklist

    def save(self, folder: str | os.PathLike) -> None:
        """Write the lists in the upstream folder layout (one `keywords.txt` per kind), never through a
        link: a linked kind folder is refused, a linked keywords.txt replaced."""
        for kind in KEYWORD_KINDS:
            write_file_below(folder, f"{kind}/keywords.txt",
                             "".join(f"{w}\n" for w in getattr(self, kind)).encode("utf-8"))

    def _word_matches(self, keyword_word: str, forms: set[str]) -> bool:
        if keyword_word in forms:
            return True
        if self.max_typos and len(keyword_word) >= self.fuzzy_min_chars:
            return any(_edit_distance_at_most_one(keyword_word, form) for form in forms)
        return False

    def find(self, prompt: str) -> BlocklistMatch | None:
        """The first blocklisted keyword in `prompt`, or None."""
        words, extras = normalized_words(prompt)
        forms = [set() if w in self._whitelisted else word_forms(w) for w in words]
        extra_forms = [(w, word_forms(w)) for w in extras if w not in self._whitelisted]
        for entry, phrase in self._phrases:
            for start in range(len(words) - len(phrase) + 1):
                if all(self._word_matches(p, forms[start + i]) for i, p in enumerate(phrase)):
                    return BlocklistMatch(entry, " ".join(words[start:start + len(phrase)]))
            if len(phrase) == 1:
                for word, word_extra_forms in extra_forms:
                    if self._word_matches(phrase[0], word_extra_forms):
                        return BlocklistMatch(entry, word)
        plain = re.sub(r"\s+", " ", to_ascii(prompt).lower())
        for entry, phrase in self._exact:
            if re.search(r"\b" + re.escape(" ".join(phrase)) + r"\b", plain):
                return BlocklistMatch(entry, " ".join(phrase))
        return None

    def is_safe(self, prompt: str) -> tuple[bool, str]:
        if not isinstance(prompt, str):
            raise TypeError(f"the prompt must be a str; got {type(prompt).__name__}")
        if not prompt.strip():
            return False, "the prompt is empty"
        match = self.find(prompt)
        if match is None:
            return True, "no blocklisted keyword"
        return False, f"the prompt contains the blocklisted keyword {match.keyword!r} (found as {match.found!r})"
