"""The target's own vocabulary as sure signs: a prompt that names one of its terms is the target.

The encoder generalises from examples and is unsure of a rare name it met twice ("Here lies Dobby,
a free"); a list of the target's names, places, spells and titles is not. A term is a sure sign
only where nothing on the retain side uses it: `fit` drops every term found in a retain training
text ("Dobby" is also a weave, "Snape" a town, "the Dark Lord" Sauron), so what is left separates
by construction and calibration measures what slips through.

Matching runs on every reading `classifier.normalize.variants` gives, plus two that cost nothing
here (ROT13 and the text reversed, where only exact terms count); words compare case-folded,
hyphens and spaces alike, with a plural on the last word, and a term within one typo: a long
one-word term ("Expeliarmus", "Quiddtich"), or one word of five letters or more in a longer term
("wingardium leviossa"), in a text of up to TYPO_MAX_WORDS words, and such a term with its vowels left
out ("Hrry Pttr", "Vldmrt") where a word of the text, of three letters or more, has none. A word as
typed that is an ordinary word of the language ("carrots", "gallows") is never read as a typo of a term
("the Carrows", "Deathly Hallows"). Terms written in scripts without spaces (Chinese, Japanese, Korean) match as
substrings. Words in Cyrillic compare without their case ending ("Поттера" is "Поттер", "таємну
кімнату" is "таємна кімната"): Russian and Ukrainian inflect names and titles.
"""
from __future__ import annotations

import codecs
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence

from classifier.normalize import variants

_WORD = re.compile(r"\w+")
_UNSPACED_SCRIPTS = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af\uf900-\ufaff]")
_PLURALS = ("s", "es")
_INFLECTIONS = ("s", "es", "ed", "ing", "ly")  # an ordinary word with one of these is ordinary too
TYPO_MIN_LENGTH = 8  # shorter words are one typo away from too many ordinary ones
TYPO_MIN_LENGTH_IN_PHRASE = 5  # the rest of the phrase, spelled right, already narrows it down
ANCHORS_PER_PHRASE = 2  # one word of a phrase may be mistyped: another one still finds it
# Typos count in a text of at most this many words: each word of a longer one is one more chance to fall
# one letter from a long term by accident ("Gunnings", Latin "obscurum"), and misspelling a name is the
# disguise of a short prompt; in a long text the encoder reads the misspelt sentence.
TYPO_MAX_WORDS = 200
_VOWELS = re.compile(r"[aeiou]")
SKELETON_MIN_LETTERS = 5  # "Snp" (Snape) is also SNP; "Vldmrt" is nothing else


_CYRILLIC = re.compile(r"[\u0400-\u04ff]")
# Russian and Ukrainian case and number endings, longest first; one is cut from a word of Cyrillic letters.
_CYRILLIC_ENDINGS = ("ами", "ями", "ого", "его", "ому", "ему", "ой", "ей", "ою", "ею", "ий", "ый", "ій", "ая",
                     "яя", "ое", "ее", "ом", "ем", "ам", "ям", "ах", "ях", "ів", "ов", "ев", "а", "я", "о", "е",
                     "и", "і", "ї", "ы", "у", "ю", "ь", "й", "є")
STEM_MIN_LENGTH = 3  # shorter stems ("ро" of "рон") would join unrelated words


def _fold(text: str) -> str:
    return unicodedata.normalize("NFKC", text).casefold()


def _stem(word: str) -> str:
    """A Cyrillic word without its inflection ending; any other word as it is."""
    if not _CYRILLIC.search(word):
        return word
    for ending in _CYRILLIC_ENDINGS:
        if word.endswith(ending) and len(word) - len(ending) >= STEM_MIN_LENGTH:
            return word[:-len(ending)]
    return word


def _words(folded: str) -> list[str]:
    return [_stem(word) for word in _WORD.findall(folded)]


def term_words(term: str) -> tuple[str, ...]:
    return tuple(_words(_fold(term)))


def readings(text: str, typos_at_any_length: bool = False) -> list[tuple[str, bool]]:
    """What the vocabulary is matched against, each with whether a typo counts there: the normalised
    readings of a text of up to TYPO_MAX_WORDS words (of any length with `typos_at_any_length`), then
    ROT13 and reversed (exact terms only: a disguise and a typo at once are rare, and in those readings
    every long word of an ordinary text would be tried as a typo)."""
    normal = variants(text)
    typos = typos_at_any_length or len(_WORD.findall(normal[0])) <= TYPO_MAX_WORDS
    return [(reading, typos) for reading in normal] + [(codecs.encode(normal[0], "rot13"), False),
                                                       (normal[0][::-1], False)]


class TermMatcher:
    """Finds the first term of a vocabulary in a text. `fit` keeps the terms no retain text uses.

    `ordinary_words`: a lexicon of the language (e.g. an encoder's word list); a word typed as one of them
    ("carrots") is never taken for a typo of a term ("the Carrows"), only the term as written is.
    """

    def __init__(self, terms: Sequence[str] = (), ordinary_words: Iterable[str] = ()):
        self.terms = list(terms)
        self.ordinary_words = ordinary_words
        self._lexicon = frozenset(_fold(word) for word in ordinary_words)

    def fit(self, retain_texts: Iterable[str]) -> "TermMatcher":
        """Keep the terms no retain text names, and allow a typo only in terms no retain word is a typo of."""
        eligible = [term for term in self.terms if self._typo_eligible(term)]
        self._index(self.terms, eligible)
        exact: dict[str, int] = {}
        typos: set[str] = set()
        for text in retain_texts:
            # a retain word one typo from a term is evidence against typos of it in any text, long or short
            for term, typo in set(self._found(text, typos_at_any_length=True)):
                if typo:
                    typos.add(term)
                else:
                    exact[term] = exact.get(term, 0) + 1
        self.dropped_terms_ = dict(sorted(exact.items(), key=lambda item: (-item[1], item[0])))
        self.terms_ = [term for term in self.terms if term not in exact]
        self.typo_terms_ = [term for term in eligible if term not in typos and term not in exact]
        self._index(self.terms_, self.typo_terms_)
        return self

    @classmethod
    def fitted(cls, terms: Sequence[str], typo_terms: Sequence[str], dropped: dict[str, int] | None = None,
               ordinary_words: Iterable[str] = ()) -> "TermMatcher":
        """A matcher from a saved fit, and the lexicon typed words are checked against."""
        matcher = cls(terms, ordinary_words)
        matcher.terms_, matcher.typo_terms_, matcher.dropped_terms_ = list(terms), list(typo_terms), dict(dropped or {})
        matcher._index(matcher.terms_, matcher.typo_terms_)
        return matcher

    @staticmethod
    def _typo_eligible(term: str) -> bool:
        words = term_words(term)
        if not words or _UNSPACED_SCRIPTS.search(term):
            return False
        if len(words) == 1:
            return len(words[0]) >= TYPO_MIN_LENGTH
        return any(len(word) >= TYPO_MIN_LENGTH_IN_PHRASE for word in words)

    def _index(self, terms: Sequence[str], typo_terms: Sequence[str]) -> None:
        self._by_words: dict[tuple[str, ...], str] = {}
        self._unspaced: list[tuple[str, str]] = []
        for term in terms:
            if _UNSPACED_SCRIPTS.search(term):
                self._unspaced.append((_fold(term), term))
            elif words := term_words(term):
                self._by_words.setdefault(words, term)
        self._longest = max((len(words) for words in self._by_words), default=0)
        # the beginnings of longer terms: a phrase is extended word by word only while it is one
        self._beginnings = {words[:length] for words in self._by_words for length in range(1, len(words))}
        # the words a term can start with (a one-word term also in the plural): most text words are none
        self._first = {words[0] + ending for words in self._by_words
                       for ending in ("", *(_PLURALS if len(words) == 1 else ()))}
        # a long one-word term, each form of it with one letter deleted (and where), for distance-one typos
        self._typo_words: dict[str, list[str]] = {}
        self._deleted: dict[tuple[str, int], list[str]] = {}
        # a longer term under each of its anchors, with the anchor's place in it: its two words fewest terms
        # share ("deathly", not "the"), so that a phrase is tried only where one of them stands
        self._anchors: dict[str, list[tuple[tuple[str, ...], int, str]]] = {}
        # and a term with its vowels left out, where that leaves enough letters to name it
        self._skeletons: dict[tuple[str, ...], str] = {}
        phrases: list[tuple[str, tuple[str, ...]]] = []
        for term in typo_terms:
            words = term_words(term)
            skeleton = _skeleton(words)
            if skeleton and sum(map(len, skeleton)) >= SKELETON_MIN_LETTERS:
                self._skeletons.setdefault(skeleton, term)
            if len(words) > 1:
                phrases.append((term, words))
                continue
            word = words[0]
            self._typo_words.setdefault(word, []).append(term)
            for position in range(len(word)):
                self._deleted.setdefault((word[:position] + word[position + 1:], position), []).append(term)
        self._longest_skeleton = max(map(len, self._skeletons), default=0)
        sharing = Counter(word for _, words in phrases for word in set(words))
        for term, words in phrases:
            places = sorted(range(len(words)), key=lambda place: (sharing[words[place]], -len(words[place])))
            for place in places[:ANCHORS_PER_PHRASE]:
                self._anchors.setdefault(words[place], []).append((words, place, term))

    def find(self, text: str) -> str | None:
        """The first term found in any reading of `text`, or None."""
        return next((term for term, _ in self._found(text)), None)

    def _found(self, text: str, typos_at_any_length: bool = False) -> Iterable[tuple[str, bool]]:
        """(term, whether it was found through a typo) for each term found, in reading order."""
        typos: dict[str, list[str]] = {}  # a long text repeats its words
        for reading, typos_count in readings(text, typos_at_any_length):
            folded = _fold(reading)
            for needle, term in self._unspaced:
                if needle in folded:
                    yield term, False
            words = _words(folded)
            if typos_count and self._skeletons:
                yield from ((term, True) for term in self._without_vowels(words))
            for start, word in enumerate(words):
                if typos_count and len(word) >= TYPO_MIN_LENGTH - 1 and self._deleted:
                    if word not in typos:
                        typos[word] = [] if self._ordinary(word) else self._typos_of(word)
                    for term in typos[word]:
                        yield term, True
                for phrase, place, term in self._anchors.get(word, ()) if typos_count else ():
                    first = start - place
                    typed = words[first:first + len(phrase)]
                    mistyped = _mistyped_word(typed, phrase) if first >= 0 else None
                    if mistyped is not None and not self._ordinary(mistyped):
                        yield term, True
                if word not in self._first:
                    continue
                for stop in range(start + 1, min(start + self._longest, len(words)) + 1):
                    phrase = tuple(words[start:stop])
                    term = self._term_at(phrase)
                    if term is not None:
                        yield term, False
                    if phrase not in self._beginnings:
                        break

    def _without_vowels(self, words: list[str]) -> Iterable[str]:
        """The terms written with their vowels left out, found where one word of three letters or more was
        typed so (a text that never drops a vowel is not read this way: "hurry patter" is not "Hrry Pttr")."""
        bare = [len(word) >= 3 and word.isascii() and word.isalpha() and not _VOWELS.search(word) for word in words]
        if not any(bare):
            return
        skeletons = [_VOWELS.sub("", word) if word.isascii() else word for word in words]
        for start in range(len(words)):
            for stop in range(start + 1, min(start + self._longest_skeleton, len(words)) + 1):
                term = self._skeletons.get(tuple(skeletons[start:stop]))
                if term is not None and any(bare[start:stop]):
                    yield term

    def _ordinary(self, word: str) -> bool:
        """Whether a typed word is an ordinary word of the lexicon, or one inflected ("hollows", "hollowed")."""
        return word in self._lexicon or any(
            word.endswith(ending) and word[:-len(ending)] in self._lexicon for ending in _INFLECTIONS)

    def _term_at(self, words: tuple[str, ...]) -> str | None:
        term = self._by_words.get(words)
        if term is None:
            last = words[-1]
            for ending in _PLURALS:
                if last.endswith(ending) and len(last) > len(ending) + 2:
                    term = self._by_words.get((*words[:-1], last[:-len(ending)]))
                    if term is not None:
                        break
        return term

    def _typos_of(self, word: str) -> list[str]:
        """The long terms one typo away from `word`: a letter missing, extra or replaced, or two
        neighbours swapped."""
        found = [self._deleted.get((word, position), []) for position in range(len(word) + 1)]  # one missing
        for position in range(len(word)):
            shorter = word[:position] + word[position + 1:]
            found += [self._typo_words.get(shorter, []), self._deleted.get((shorter, position), [])]  # extra, replaced
        for position in range(len(word) - 1):
            swapped = word[:position] + word[position + 1] + word[position] + word[position + 2:]
            found.append(self._typo_words.get(swapped, []))
        return list(dict.fromkeys(term for terms in found for term in terms if term_words(term)[0] != word))


def _skeleton(words: tuple[str, ...]) -> tuple[str, ...] | None:
    """The words without their vowels, or None where that leaves a word empty or the term is not in Latin."""
    if not all(word.isascii() and word.isalpha() for word in words):
        return None
    skeleton = tuple(_VOWELS.sub("", word) for word in words)
    return skeleton if all(skeleton) else None


def _mistyped_word(typed: list[str], phrase: tuple[str, ...]) -> str | None:
    """The word as typed, when the words typed are the phrase with exactly one of its words of 5 letters or
    more mistyped; else None."""
    if len(typed) != len(phrase):
        return None
    different = [place for place, (a, b) in enumerate(zip(typed, phrase)) if a != b]
    if len(different) == 1 and len(phrase[different[0]]) >= TYPO_MIN_LENGTH_IN_PHRASE and \
            _one_typo_apart(typed[different[0]], phrase[different[0]]):
        return typed[different[0]]
    return None


def _one_typo_apart(typed: str, word: str) -> bool:
    """One letter missing, extra or replaced, or two neighbours swapped (and not the same word)."""
    if typed == word or abs(len(typed) - len(word)) > 1:
        return False
    start = next((i for i, (a, b) in enumerate(zip(typed, word)) if a != b), min(len(typed), len(word)))
    if len(typed) == len(word):
        return typed[start + 1:] == word[start + 1:] or (
            typed[start + 2:] == word[start + 2:] and typed[start:start + 2] == word[start:start + 2][::-1])
    if len(typed) < len(word):
        return typed[start:] == word[start + 1:]
    return typed[start + 1:] == word[start:]

