"""What the gate scores for one text: the text itself when short, sentence windows when long."""
from __future__ import annotations

import random

import pytest

from classifier.segments import segments, sentence_spans, word_count

pytestmark = pytest.mark.unit

_WORDS = ("river cloud market engine stone garden music light paper window table bridge harbour lantern "
          "orchard meadow copper violin ledger ferry").split()
TARGET = "Who taught Potions to Harry Potter in his first year at Hogwarts?"


def _benign(words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    sentences, total = [], 0
    while total < words:
        size = min(rng.randint(6, 28), words - total)
        sentences.append(" ".join(rng.choice(_WORDS) for _ in range(size)).capitalize() + ".")
        total += size
    return " ".join(sentences)


def test_a_short_prompt_is_one_segment():
    assert segments("Who is Harry Potter?") == ["Who is Harry Potter?"]
    assert segments(_benign(40)) == [_benign(40)]


def test_sentences_end_at_marks_lines_and_cjk():
    text = 'He said "Stop." Then (she left.) Ok? Yes; fine\nNext \u4f60\u597d\u3002\u518d\u89c1\uff01\u597d'
    pieces = [text[a:b] for a, b in sentence_spans(text)]
    assert pieces == ['He said "Stop."', "Then (she left.)", "Ok?", "Yes;", "fine", "Next \u4f60\u597d\u3002",
                      "\u518d\u89c1\uff01", "\u597d"]
    assert word_count("Next \u4f60\u597d\u3002") == 3


@pytest.mark.parametrize("position", [0.0, 0.37, 0.81, 1.0])
def test_a_buried_target_lands_in_a_small_segment(position):
    body = _benign(2000)
    spans = sentence_spans(body)
    at = spans[int(position * (len(spans) - 1))][0] if position < 1 else len(body) + 1
    text = (body[:at] + TARGET + " " + body[at:]).strip()
    pieces = segments(text, max_words=40)
    assert any(TARGET in piece and word_count(piece) <= 40 for piece in pieces)
    assert all(word_count(piece) <= 40 for piece in pieces)


def test_a_long_text_gives_a_bounded_number_of_segments():
    pieces = segments(_benign(2000))
    assert 50 <= len(pieces) <= 150  # about one per sentence with 6-28-word sentences
    run_on = " ".join(random.Random(1).choice(_WORDS) for _ in range(2000))
    chunks = segments(run_on, max_words=40)
    assert len(chunks) <= 2000 // 20 and all(word_count(c) <= 40 for c in chunks)
    phrase = "the boy who lived under the stairs at number four Privet Drive"
    words = run_on.split()
    seeded = " ".join(words[:1000] + phrase.split() + words[1000:])
    assert any(phrase in c for c in segments(seeded, max_words=40))  # half-window overlap keeps it whole


def test_a_moderate_text_is_also_scored_whole():
    text = _benign(120)
    pieces = segments(text, max_words=40, whole_max_words=160)
    assert pieces[0] == text and len(pieces) > 1
    assert text not in segments(text, max_words=40, whole_max_words=100)
