"""The pieces of one text that the gate scores, so that a target sentence is never diluted.

A short prompt is scored whole. A long one is cut at sentence ends into windows of a few
sentences (at most `max_words` words, neighbours sharing a sentence), so a forget sentence
buried in 2,000 words of unrelated text is scored nearly on its own. A text of moderate length
is also scored whole, because context spread over several sentences can make a prompt a
forget request when no single sentence is. CJK, kana and hangul characters count as a word each.
"""
from __future__ import annotations

import re

# One word: a CJK ideograph, kana or hangul syllable alone, or a run of other characters that are
# neither spaces nor CJK punctuation.
_IDEOGRAPHS = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff66-\uff9f"
_CJK_PUNCTUATION = "\u3000-\u303f\uff01-\uff0f\uff1a-\uff20"
_WORD = re.compile(rf"[{_IDEOGRAPHS}]|[^\s{_IDEOGRAPHS}{_CJK_PUNCTUATION}]+")
# A sentence ends at . ! ? ; (or the Devanagari, Arabic, Urdu and Ethiopic marks) and a space, right
# after a CJK mark, or at a line break.
_END_MARK = "[.!?;…।॥؟۔።]"
_SENTENCE_END = re.compile(rf"(?:(?<={_END_MARK})|(?<={_END_MARK}[\"'”’)\]]))\s+|(?<=[。！？；])\s*|\s*\n\s*")


def word_count(text: str) -> int:
    return sum(1 for _ in _WORD.finditer(text))


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each sentence, without the spaces between sentences."""
    spans, start = [], 0
    for end in _SENTENCE_END.finditer(text):
        piece = text[start:end.start()]
        if piece.strip():
            spans.append((start, end.start()))
        start = end.end()
    if text[start:].strip():
        spans.append((start, len(text)))
    return spans


def _word_chunks(text: str, span: tuple[int, int], max_words: int, overlap_words: int) -> list[tuple[int, int]]:
    """A sentence longer than max_words as chunks of max_words words, overlapping by overlap_words."""
    words = [(m.start(), m.end()) for m in _WORD.finditer(text, span[0], span[1])]
    step = max(1, max_words - overlap_words)
    chunks = []
    for first in range(0, len(words), step):
        last = min(first + max_words, len(words))
        chunks.append((words[first][0], words[last - 1][1]))
        if last == len(words):
            break
    return chunks


def segments(text: str, max_words: int = 40, overlap_sentences: int = 1, whole_max_words: int = 160,
             overlap_words: int | None = None) -> list[str]:
    """The text itself when short; else windows of whole sentences (plus the text when <= whole_max_words).

    overlap_words: how many words consecutive chunks of one over-long sentence share
    (default max_words // 2, so any passage of up to half a window lies wholly in one chunk).
    """
    total = word_count(text)
    if total <= max_words:
        return [text]
    overlap = max_words // 2 if overlap_words is None else overlap_words
    units: list[tuple[int, int, int]] = []  # (start, end, words) of sentences, over-long ones cut
    for span in sentence_spans(text):
        words = word_count(text[span[0]:span[1]])
        if words <= max_words:
            units.append((span[0], span[1], words))
        else:
            units.extend((s, e, word_count(text[s:e])) for s, e in _word_chunks(text, span, max_words, overlap))
    windows = [text] if total <= whole_max_words else []
    first = 0
    while first < len(units):
        last, words = first, 0
        while last < len(units) and (last == first or words + units[last][2] <= max_words):
            words += units[last][2]
            last += 1
        windows.append(text[units[first][0]:units[last - 1][1]])
        if last == len(units):
            break
        first = max(first + 1, last - overlap_sentences)
    return list(dict.fromkeys(windows))
