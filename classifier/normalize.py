"""What a prompt says once disguises are undone, so the gate scores meaning rather than spelling.

`canonical` undoes what never changes meaning: compatibility forms (NFKC), invisible
characters, and look-alike letters from another script inside a Latin word (the Unicode
confusables data, through `confusable_homoglyphs`). Genuine non-Latin text keeps its script.

`variants` adds readings that may or may not be meant: letters spaced apart joined again,
punctuation inside words dropped, leetspeak read as letters (a "1" as an i, and again as an l),
words written upside down turned back (in reversed order and in place), a Latin transliteration of other scripts (`anyascii`),
base64 decoded where it decodes to text, the ROT13 reading of a text that names ROT13, and a text
in Pig Latin ("Arryhay Otterpay") read back, two ways (see `_from_pig_latin`).
The gate scores every variant and keeps the highest, so a wrong reading costs nothing but a
score. Plain text takes a fast path and yields itself alone.
"""
from __future__ import annotations

import binascii
import codecs
import re
import unicodedata
from functools import lru_cache

from anyascii import anyascii
from confusable_homoglyphs.categories import alias
from confusable_homoglyphs.confusables import confusables_data

# Invisible in rendering, so free to sprinkle inside a word: format characters (category Cf,
# which holds the soft hyphen, zero-width space/joiners, bidi controls and tag characters),
# variation selectors, the combining grapheme joiner and the Hangul fillers.
_INVISIBLE_MARKS = frozenset(
    [0x034F, 0x115F, 0x1160, 0x3164, 0xFFA0, *range(0x180B, 0x1810), *range(0xFE00, 0xFE10),
     *range(0xE0100, 0xE01F0)])
# Combining marks left on a Latin letter after NFKC composed what it could: strike-through or
# "zalgo" overlays (marks on other scripts' letters are left alone).
_OVERLAY = re.compile(r"([A-Za-z\u00C0-\u024F\u1E00-\u1EFF])"
                      r"[\u0300-\u036F\u1AB0-\u1AFF\u1DC0-\u1DFF\u20D0-\u20FF\uFE20-\uFE2F]+")
_NEUTRAL_SCRIPTS = frozenset({"COMMON", "INHERITED", "Unknown"})
_ASCII_LETTERS = re.compile(r"[A-Za-z]+")
_LATIN_EXTENDED = re.compile(r"[\u00C0-\u024F\u1E00-\u1EFF]")  # accented Latin letters
# A word with a letter outside ASCII (tried only where a word starts, so that a miss costs one pass).
_FOREIGN_WORD = re.compile(r"(?<![^\W\d_])[^\W\d_]*?[^\x00-\x7f\W\d_][^\W\d_]*")


@lru_cache(maxsize=1)
def _invisible() -> re.Pattern[str]:
    """One character class of every invisible character (re has no class for category Cf). Format
    characters live in the first two planes and in plane 14 (tags), so only those are scanned."""
    codes = sorted(_INVISIBLE_MARKS | {c for c in [*range(0x20000), *range(0xE0000, 0xE1000)]
                                       if unicodedata.category(chr(c)) == "Cf"})
    ranges: list[list[int]] = []
    for code in codes:
        if ranges and code == ranges[-1][1] + 1:
            ranges[-1][1] = code
        else:
            ranges.append([code, code])
    return re.compile("[" + "".join(re.escape(chr(a)) + ("-" + re.escape(chr(b)) if b > a else "")
                                    for a, b in ranges) + "]+")


@lru_cache(maxsize=4096)
def _script(char: str) -> str:
    return alias(char)


@lru_cache(maxsize=4096)
def _latin_skeleton(char: str, direct: bool) -> str | None:
    """The ASCII letters `char` is confusable with, or None; `direct` allows no second hop."""
    frontier, seen = [char], {char}
    for _ in range(1 if direct else 2):
        following = []
        for glyph in frontier:
            for entry in confusables_data.get(glyph, ()):
                candidate = entry["c"]
                if candidate.isascii() and candidate.isalpha():
                    return candidate
                if candidate not in seen and len(candidate) == 1:
                    seen.add(candidate)
                    following.append(candidate)
        frontier = following
    return None


@lru_cache(maxsize=65536)
def _fold_word(word: str, latin_text: bool) -> str:
    """Look-alikes folded to Latin in a word that mixes Latin with another script, or, inside a
    mostly Latin text, in a word made only of direct look-alikes of Latin letters."""
    scripts = {_script(c) for c in word} - _NEUTRAL_SCRIPTS
    if scripts == {"LATIN"} or not scripts:
        return word
    if "LATIN" in scripts:
        return "".join(c if _script(c) in _NEUTRAL_SCRIPTS | {"LATIN"} else _latin_skeleton(c, False) or c
                       for c in word)
    if latin_text and len(word) > 1:
        folded = [_latin_skeleton(c, True) for c in word]
        if all(folded):
            return "".join(folded)  # type: ignore[arg-type]
    return word


def canonical(text: str) -> str:
    """NFKC, invisible characters removed, cross-script look-alikes inside Latin words folded."""
    if text.isascii():
        return text  # NFKC leaves ASCII alone and ASCII has no format characters or look-alikes
    text = _OVERLAY.sub(r"\1", _invisible().sub("", unicodedata.normalize("NFKC", text)))
    foreign = "".join(_FOREIGN_WORD.findall(text))
    if not foreign:
        return text
    ascii_letters = sum(map(len, _ASCII_LETTERS.findall(text)))
    other = len(foreign) - len(foreign.encode("ascii", "ignore"))
    latin_text = (ascii_letters + len(_LATIN_EXTENDED.findall(foreign))) * 2 > ascii_letters + other
    return _FOREIGN_WORD.sub(lambda m: _fold_word(m.group(), latin_text), text)


_anyascii = lru_cache(maxsize=65536)(anyascii)


def _transliterated(text: str) -> str:
    return _FOREIGN_WORD.sub(lambda m: _anyascii(m.group()), text)


# -- variants ------------------------------------------------------------------------------
_LEET = {"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "9": "g",
         "@": "a", "$": "s", "|": "l", "!": "i", "€": "e"}
_LEET_SYMBOLS = "@$|!€"
_LEET_SYMBOLS_IN = re.compile(r"[@$|!€]")
_LEET_CHAR = re.compile(r"[0-9@$|!€]")
_LEET_TOUCH = re.compile(r"[^\W\d_][0-9@$|!€]|[0-9@$|!€][^\W\d_]")
# A word in which a letter touches a digit or a symbol that leetspeak uses for a letter.
_LEET_WORD = re.compile(r"(?<![\w@$|!€])[\w@$|!€]*?(?:[^\W\d_][0-9@$|!€]|[0-9@$|!€][^\W\d_])[\w@$|!€]*")
# Words whose digits are meant as digits: quantities (3rd, 4K, 10am, 5min) and model numbers (mp3, Python3).
_QUANTITY = re.compile(r"\d+(?:st|nd|rd|th|s|am|pm|k|m|g|x|d|h|p|c|f|l|v|w|px|kg|km|cm|mm|ml|mg|gb|mb|tb|hz|kw|fps|mph"
                       r"|min|mins|sec|secs|ms|hr|hrs|yr|yrs|lb|lbs|oz|ft)", re.IGNORECASE)
_MODEL_NUMBER = re.compile(r"[^\W\d_]+\d+")
# Three or more single characters with separators between them: "V o l d e m o r t", "D.r.a.c.o".
_SPACED = re.compile(r"(?<![^\W_])[^\W_](?:[ .\-_*·•~+/|:]{1,3}[^\W_](?![^\W_])){2,}")
_SEPARATOR = re.compile(r"[ .\-_*·•~+/|:]{1,3}")
_INNER_PUNCTUATION = re.compile(r"([^\W\d_])[.·•*_~^:]+(?=[^\W\d_])")
_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z][a-z])")
# A run long enough to be base64 of a sentence rather than a word or an identifier.
_BASE64 = re.compile(r"(?<![\w+/=])[A-Za-z0-9+/]{16,}={0,2}(?![\w+/=])")
_ROT13_NAMED = re.compile(r"\brot[\s\-]?13\b", re.IGNORECASE)
_WORD_OF_LETTERS = re.compile(r"[A-Za-z]+(?:-[A-Za-z]+)?")
_PIG_LATIN_WORD = re.compile(r"([A-Za-z]*?)-?([^aeiouAEIOU\W\d_]*)ay", re.IGNORECASE)
# The consonant clusters an English word can start with: the longest one at the end of a Pig Latin stem
# is one reading of where the word began ("amberch" is "chamber", not "rchambe").
_ONSETS = frozenset("bl br ch cl cr dr fl fr gl gr kn ph pl pr qu sc sh sk sl sm sn sp st sw th tr tw wh wr "
                    "sch scr shr spl spr squ str thr".split())


def _leet_core(token: str) -> str | None:
    """The part of a word that leetspeak may spell, or None: a trailing "!" or a leading "@" is
    punctuation, and a quantity is a number."""
    core = token.strip(_LEET_SYMBOLS)
    if not core or not any(c.isalpha() for c in core) or not _LEET_CHAR.search(core) or _QUANTITY.fullmatch(core):
        return None
    return core


def _unleet(text: str, one: str = "i") -> str:
    """Leetspeak read as letters in every word that mixes them, once one word that is not a model
    number (mp3) shows that the text is leetspeak. `one` is the letter "1" stands for: "i" or "l"."""
    if not _LEET_TOUCH.search(text):
        return text
    words = [(m, _leet_core(m.group())) for m in _LEET_WORD.finditer(text)]
    if not any(core and (not _MODEL_NUMBER.fullmatch(core) or _LEET_SYMBOLS_IN.search(core)) for _, core in words):
        return text
    pieces, at = [], 0
    for match, core in words:
        if core:
            start = match.start() + match.group().index(core)
            pieces += [text[at:start], "".join(one if c == "1" else _LEET.get(c, c) for c in core)]
            at = start + len(core)
    return "".join(pieces) + text[at:]


def _join_run(match: re.Match[str]) -> str:
    """Single characters joined; a word ends at a separator unlike the usual one that has a space in it
    (or is longer, when the usual one is a space), and where a capital follows a small letter."""
    run = match.group()
    separators = _SEPARATOR.findall(run)
    pieces = _SEPARATOR.split(run)
    if sum(p.isalpha() for p in pieces) < 2:
        return run
    usual = max(sorted(set(separators)), key=separators.count)

    def breaks(separator: str) -> bool:
        if separator == usual:
            return False
        return len(separator) > len(usual) if " " in usual else " " in separator

    joined = pieces[0] + "".join((" " if breaks(s) else "") + p for s, p in zip(separators, pieces[1:]))
    return _CAMEL.sub(" ", joined)


def _join_spacing(text: str) -> str:
    return _SPACED.sub(_join_run, text)


def _drop_inner_punctuation(text: str) -> str:
    return _INNER_PUNCTUATION.sub(r"\1", text)


def _decoded_base64(text: str) -> str:
    """Each base64 run that decodes to UTF-8 text (letters and spaces, nothing unprintable) replaced by
    that text; hashes, keys and identifiers decode to bytes that are not text and stay as they are."""
    def decode(match: re.Match[str]) -> str:
        run = match.group()
        try:
            plain = binascii.a2b_base64(run + "=" * (-len(run) % 4), strict_mode=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return run
        readable = plain.isprintable() and " " in plain.strip() and sum(c.isalpha() for c in plain) * 2 > len(plain)
        return plain if readable else run
    return _BASE64.sub(decode, text)


@lru_cache(maxsize=1)
def _upside_down() -> tuple[dict[str, str], re.Pattern[str]]:
    """Each glyph of upside-down writing and the letter it stands for; and a pattern for a word that
    uses one, with the words of that kind right after it. The turned letters come from their Unicode
    names ("LATIN SMALL LETTER TURNED E"); the rest are the stand-ins flip generators use where Unicode
    has no turned letter, and the letters that are each other's half-turn (n/u, d/p, b/q) once a word
    is known to be upside down."""
    turned = re.compile(r"(?:LATIN (SMALL|CAPITAL) LETTER|TURNED(?: SANS-SERIF)? (CAPITAL))"
                        r" (?:TURNED )?([A-Z])")
    letters: dict[str, str] = {}
    for code in range(0x2200):
        name = unicodedata.name(chr(code), "")
        if "TURNED" in name and (match := turned.fullmatch(name)):
            letters[chr(code)] = match[3] if (match[1] or match[2]) == "CAPITAL" else match[3].lower()
    letters.update({"ɔ": "c", "ƃ": "g", "ɟ": "f", "ɾ": "j", "∀": "A", "Ǝ": "E", "ꓷ": "D", "ꓕ": "T", "Ԁ": "P",
                    "ꓤ": "R", "ꓭ": "B", "ꓘ": "K", "ꓶ": "L"})
    word = r"[^\W\d_]*[" + re.escape("".join(letters)) + r"][^\W\d_]*"
    marked = re.compile(rf"{word}(?:\s+{word})*")  # a run of such words: turned, their order reverses too
    # and, once a word is known to be upside down, a dotless ı (Turkish writes it too) is an i
    letters.update({"n": "u", "u": "n", "d": "p", "p": "d", "b": "q", "q": "b", "ı": "i"})
    return letters, marked


def _turn_upright(text: str, reverse: bool = True) -> str:
    """Words written upside down ("ǝdɐuS") read upright ("Snape"): reversed, each glyph turned back; a run
    of them turned as one, so that "ɹǝʇʇoԀ ʎɹɹɐH" reads "Harry Potter". Without `reverse`, each glyph
    turned in place, for the flip generators that keep the reading order ("ʍɥo" is "who")."""
    letters, marked = _upside_down()
    return marked.sub(lambda m: "".join(letters.get(c, c) for c in (reversed(m.group()) if reverse else m.group())),
                      text)


def _looks_like_pig_latin(text: str) -> bool:
    """Two words or more, and most of them, in the shape of Pig Latin: a vowel first, since the consonants
    that began the word moved to its end, and "ay" last ("Owhay illedkay", not "Today I may play")."""
    words = [w.lower() for w in _WORD_OF_LETTERS.findall(text) if len(w) > 2]
    in_pig_latin = sum(w[0] in "aeiou" and w.endswith("ay") for w in words)
    return in_pig_latin >= 2 and in_pig_latin * 3 >= len(words) * 2


def _capitalised_like(model: str, word: str) -> str:
    return word[0].upper() + word[1:] if model[:1].isupper() else word


def _from_pig_latin(text: str, longest_onset: bool) -> str:
    """Each word ending in "ay" read back: the consonants before "ay" return to the front ("Otterpay" is
    "potter", "Oblet-gay" is "goblet"), "way"/"yay" after a vowel-initial word are dropped ("andway" is
    "and"). Where the word began is ambiguous ("ogwartshay": "h" or "sh"); `longest_onset` takes the
    longest cluster a word can start with, else one consonant ("qu" counts as one)."""
    def back(match: re.Match[str]) -> str:
        word = match.group()
        if "-" in word:
            stem, moved = word[:-2].split("-", 1)
            return _capitalised_like(stem, moved + stem.lower())
        lower = word.lower()
        if lower.endswith(("way", "yay")) and lower[0] in "aeiou":
            return word[:-3]
        stem = word[:-2]
        cluster = _PIG_LATIN_WORD.fullmatch(word)[2]  # type: ignore[index]
        if stem.lower().endswith("qu"):
            size = 2
        elif not cluster:
            return word
        elif longest_onset:
            size = max((n for n in range(2, len(cluster) + 1) if cluster[-n:].lower() in _ONSETS), default=1)
        else:
            size = 1
        if size >= len(stem):
            return word
        return _capitalised_like(stem, stem[-size:].lower() + stem[:-size].lower())
    return _WORD_OF_LETTERS.sub(lambda m: back(m) if m.group().lower().endswith("ay") else m.group(), text)


def variants(text: str, limit: int = 6) -> list[str]:
    """`canonical(text)` first, then the distinct readings of it that undo obfuscation (at most `limit`)."""
    return list(_variants(text, limit))


@lru_cache(maxsize=64)  # the gate reads a prompt twice: its vocabulary stage, then its encoder's pieces
def _variants(text: str, limit: int) -> tuple[str, ...]:
    base = canonical(text)
    joined = _drop_inner_punctuation(_join_spacing(base))
    base_unleet = _unleet(base)
    candidates = [base, base_unleet if joined == base else _unleet(joined), joined, base_unleet]
    if "1" in base and candidates[1] != joined:  # "1" is an i as often as an l: "H@l10w5" is "Hallows"
        candidates.insert(2, _unleet(joined, one="l"))
    if not text.isascii() and (upright := _turn_upright(text)) != text:  # before folding, which reads ꓷ otherwise
        candidates[1:1] = [canonical(upright), canonical(_turn_upright(text, reverse=False))]
    if (decoded := _decoded_base64(base)) != base:
        candidates.insert(1, decoded)
    if _ROT13_NAMED.search(base):
        candidates.insert(1, codecs.encode(base, "rot13"))
    if _looks_like_pig_latin(base):
        candidates[1:1] = [_from_pig_latin(base, longest_onset=True), _from_pig_latin(base, longest_onset=False)]
    if _FOREIGN_WORD.search(base):
        candidates.append(_transliterated(base))
        if candidates[1] != base:
            candidates.append(_transliterated(candidates[1]))
    unique: list[str] = []
    for candidate in candidates:
        if candidate not in unique:
            unique.append(candidate)
    return tuple(unique[:limit])
