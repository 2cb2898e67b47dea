"""The keyword blocklist: the first text guardrail, run before the guard LLM (as upstream does).

A prompt is refused when one of its words (or runs of words) is a blocklisted keyword, matched
as a whole word, case-insensitively, after undoing the trivial disguises:

- plurals and inflections: "Zorblaxes", "zorblaxing" and "zorblaxed" all reduce to "zorblax";
- separators inside a word: "zor-blax", "zor.blax", "z_o_r_b_l_a_x";
- letters spaced apart: "z o r b l a x";
- leetspeak: "z0rbl4x", "$orblax";
- what a reader cannot see (`lookalikes.py`): accents ("zörblax"), letters of other scripts that
  look the same (a Cyrillic "о", a Greek omicron), zero-width characters and soft hyphens inside
  the word, fullwidth and other compatibility forms.

Keywords in other scripts (Cyrillic, CJK, ...) match as they are; in scripts written without
spaces (CJK, Thai, ...) each character is a word, so a keyword matches anywhere in a run of them.
Matching takes time linear in the prompt: each keyword is a path in a trie of words, walked from
each word of the prompt (and a table of one-letter deletions when typos are allowed), never one
pattern per keyword. The whole blocklist is bounded (`MAX_KEYWORDS`, `MAX_BLOCKLIST_BYTES`);
a keyword left with no word to match once normalised is dropped with a warning naming it.

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
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ..modeling.folder import contained_path, read_file_below, write_file_below
from .lookalikes import reader_form

logger = logging.getLogger(__name__)

KEYWORD_KINDS = ("custom", "exact_match", "whitelist")
MAX_LIST_FILE_BYTES = 16 * 1024 * 1024   # a keyword list is text; anything larger is not one
# The whole blocklist (all kinds together): upstream's lists hold a few thousand keywords.
MAX_KEYWORDS = 200_000
MAX_BLOCKLIST_BYTES = 4 * 1024 * 1024    # UTF-8 bytes of all keywords
MAX_KEYWORD_CHARS = 256
MAX_PHRASE_WORDS = 16
LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "@": "a", "$": "s",
                      "!": "i", "|": "l", "+": "t"})
# Characters that may sit inside a disguised word ("zor-blax", "z.o.r.b"), removed before matching.
INNER_SEPARATORS = re.compile(r"[-_.*'`~^:;,/\\]+")
# Scripts written without spaces between words: each character is a word of its own.
_UNSPACED = "\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u2e80-\u9fff\uf900-\ufaff\U00020000-\U0003ffff"
# A word: one character of an unspaced script, or a run of other letters (digits end a word).
WORD = re.compile(f"[{_UNSPACED}]|[^\\W\\d_{_UNSPACED}]+")
# Exact-match keywords keep digits: "area 51" is two words.
EXACT_WORD = re.compile(f"[{_UNSPACED}]|[^\\W_{_UNSPACED}]+")
SENTENCE_PUNCTUATION = "!?.,;:()[]{}\"'"


def word_forms(word: str) -> set[str]:
    """The word and its candidate stems: plural and inflection suffixes removed (a light lemmatiser
    that over-generates on purpose: a candidate only matters if it is a blocklisted keyword)."""
    forms = {word}
    if not word.isascii():
        return forms  # English suffixes only
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
    """The prompt as lowercase words as a reader sees them (leetspeak undone, split at separators),
    and the extra whole-word readings of disguised words: "zor-blax" and "z o r b l a x" read as "zorblax"."""
    words, extras = [], []
    for chunk in reader_form(text).split():
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


def exact_words(text: str) -> list[str]:
    """Words of `text` for exact matching: as a reader sees them, no leetspeak or stemming."""
    return EXACT_WORD.findall(reader_form(text))


def _deletions(word: str) -> set[str]:
    """The word and every string one character shorter: two words are within one typo (an edit or
    a swap of neighbours) exactly when their sets share a string."""
    return {word} | {word[:i] + word[i + 1:] for i in range(len(word))}


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


def _check_size(lists: dict[str, list[str]]) -> None:
    """ValueError unless the whole blocklist is within the bounds that keep loading and matching cheap."""
    count = sum(len(words) for words in lists.values())
    if count > MAX_KEYWORDS:
        raise ValueError(f"the blocklist has {count} keywords (custom, exact_match and whitelist together); "
                         f"at most {MAX_KEYWORDS} are allowed")
    total = 0
    for kind, words in lists.items():
        for word in words:
            if len(word) > MAX_KEYWORD_CHARS:
                raise ValueError(f"blocklist {kind} keyword {word[:40]!r}... has {len(word)} characters "
                                 f"(at most {MAX_KEYWORD_CHARS})")
            if len(word.split()) > MAX_PHRASE_WORDS:
                raise ValueError(f"blocklist {kind} keyword {word[:40]!r} has more than {MAX_PHRASE_WORDS} words")
            total += len(word.encode("utf-8", "surrogatepass"))
    if total > MAX_BLOCKLIST_BYTES:
        raise ValueError(f"the blocklist's keywords take {total} bytes; at most {MAX_BLOCKLIST_BYTES} are allowed")


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
        _check_size({kind: getattr(self, kind) for kind in KEYWORD_KINDS})
        dropped: list[str] = []
        self._whitelisted = {w for entry in self.whitelist for w in normalized_words(entry)[0]}
        # Custom keywords: a trie of word tuples, walked from each word of the prompt.
        self._phrases: dict[tuple[str, ...], str] = {}
        self._prefixes: set[tuple[str, ...]] = set()
        for entry in self.custom:
            words = tuple(normalized_words(entry)[0])
            if not words:
                dropped.append(entry)
                continue
            self._phrases.setdefault(words, entry)
            self._prefixes.update(words[:n] for n in range(1, len(words) + 1))
        # Exact-match keywords: a table of word tuples, looked up at each word for each length listed.
        self._exact: dict[tuple[str, ...], str] = {}
        for entry in self.exact_match:
            words = tuple(exact_words(entry))
            if words:
                self._exact.setdefault(words, entry)
            else:
                dropped.append(entry)
        self._exact_lengths = sorted({len(words) for words in self._exact})
        # Typos: keyword words long enough, by each of their one-deletion strings.
        self._typo_index: dict[str, set[str]] = {}
        self._longest_word = max((len(w) for words in self._phrases for w in words), default=0)
        if self.max_typos:
            for words in self._phrases:
                for word in words:
                    if len(word) >= self.fuzzy_min_chars:
                        for key in _deletions(word):
                            self._typo_index.setdefault(key, set()).add(word)
        if dropped:
            warnings.warn(
                f"Blocklist: {len(dropped)} keyword(s) have no letters or digits once normalised and can never "
                f"match, dropped: {', '.join(repr(d) for d in dropped[:50])}" + (" ..." if len(dropped) > 50 else ""),
                UserWarning, stacklevel=3,
            )

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

    def _forms(self, word: str) -> set[str]:
        """Keyword words `word` of the prompt may stand for: its stems, and with typos allowed,
        keyword words one typo away from one of them."""
        if word in self._whitelisted:
            return set()
        forms = word_forms(word)
        if self._typo_index:
            for form in list(forms):
                if len(form) <= self._longest_word + 1:
                    forms |= {w for key in _deletions(form) for w in self._typo_index.get(key, ())}
        return forms

    def find(self, prompt: str) -> BlocklistMatch | None:
        """The first blocklisted keyword in `prompt`, or None."""
        words, extras = normalized_words(prompt)
        forms = [self._forms(w) for w in words]
        for start in range(len(words)):
            frontier: set[tuple[str, ...]] = {()}
            for depth in range(min(MAX_PHRASE_WORDS, len(words) - start)):
                frontier = {path + (form,) for path in frontier for form in forms[start + depth]
                            if path + (form,) in self._prefixes}
                if not frontier:
                    break
                for path in frontier:
                    if path in self._phrases:
                        return BlocklistMatch(self._phrases[path], " ".join(words[start:start + depth + 1]))
        for word in extras:
            for form in self._forms(word):
                if (form,) in self._phrases:
                    return BlocklistMatch(self._phrases[(form,)], word)
        plain = exact_words(prompt)
        for start in range(len(plain)):
            for length in self._exact_lengths:
                phrase = tuple(plain[start:start + length])
                if phrase in self._exact:
                    return BlocklistMatch(self._exact[phrase], " ".join(phrase))
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
