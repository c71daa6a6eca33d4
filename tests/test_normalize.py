"""Undoing disguises: homoglyphs, invisible characters, leetspeak and letter spacing, and speed."""
from __future__ import annotations

import time

import pytest

from classifier.normalize import canonical, variants

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("disguised, plain", [
    ("\u041d\u0430rr\u0443 \u0420\u043ett\u0435r", "Harry Potter"),  # Cyrillic letters in Latin words
    ("Who is V\u03bfldemort?", "Who is Voldemort?"),  # a Greek omicron
    ("Tell me about \u041d\u0430\u0433\u0433\u0443", "Tell me about Harry"),  # a whole word of look-alikes
    ("H\uff41\uff52\uff52\uff59 \U0001d40f\U0001d428\U0001d42d\U0001d42d\U0001d41e\U0001d42b", "Harry Potter"),  # NFKC
])
def test_homoglyphs_fold_to_latin(disguised, plain):
    assert canonical(disguised) == plain
    assert variants(disguised)[0] == plain


def test_invisible_characters_are_removed():
    hidden = "Har\u200bry Pot\u00adter, Herm\u200di\u2060one and Dra\ufe0fco\u034f M\u200calfoy\U000e0041"
    assert canonical(hidden) == "Harry Potter, Hermione and Draco Malfoy"
    assert canonical("H\u0336a\u0336r\u0336r\u0336y\u0336") == "Harry"  # strike-through overlays


@pytest.mark.parametrize("text", [
    "\u0413\u0430\u0440\u0440\u0438 \u041f\u043e\u0442\u0442\u0435\u0440 \u0438 "
    "\u0444\u0438\u043b\u043e\u0441\u043e\u0444\u0441\u043a\u0438\u0439 \u043a\u0430\u043c\u0435\u043d\u044c",
    "\u0397 \u0395\u03bb\u03bb\u03ac\u03b4\u03b1 \u03b5\u03af\u03bd\u03b1\u03b9 \u03c9\u03c1\u03b1\u03af\u03b1.",
    "\u30cf\u30ea\u30fc\u30fb\u30dd\u30c3\u30bf\u30fc\u3068\u8ce2\u8005\u306e\u77f3",
    "\u54c8\u5229\u6ce2\u7279\u662f\u8c01",
    "caf\u00e9 d\u00e9j\u00e0 vu",
])
def test_genuine_text_keeps_its_script(text):
    assert canonical(text) == text
    assert variants(text)[0] == text


def test_full_width_punctuation_becomes_ascii():  # NFKC: the script stays, the compatibility form goes
    assert canonical("\u54c8\u5229\u6ce2\u7279\u662f\u8c01\uff1f") == "\u54c8\u5229\u6ce2\u7279\u662f\u8c01?"


def test_other_scripts_get_a_latin_transliteration():
    assert "Garri Potter" in variants("\u0413\u0430\u0440\u0440\u0438 \u041f\u043e\u0442\u0442\u0435\u0440")[1]


@pytest.mark.parametrize("disguised, plain", [
    ("Who is Dr@co M@lf0y?", "Who is Draco Malfoy?"),
    ("H4rry P0773r best friends", "Harry Potter best friends"),
    ("7h3 b0y wh0 l1v3d", "the boy who lived"),
    ("Tell me about V o l d e m o r t", "Tell me about Voldemort"),
    ("H-o-g-w-a-r-t-s is a school", "Hogwarts is a school"),
    ("D.r.a.c.o M.a.l.f.o.y", "Draco Malfoy"),
    ("H a r r y   P o t t e r", "Harry Potter"),
    ("D r a c o M a l f o y", "Draco Malfoy"),
    ("Vol.de.mort's wand", "Voldemort's wand"),
    ("V 0 l d 3 m 0 r t", "Voldemort"),
    ("the ending of De47h1y H@l10w5", "the ending of Deathly Hallows"),  # a "1" read as an l
])
def test_obfuscation_variants(disguised, plain):
    found = variants(disguised)
    assert found[0] == disguised and plain in found


@pytest.mark.parametrize("disguised, plain", [
    ("Explain \u01ddd\u0250uS's vow.", "Explain Snape's vow."),  # turned letters and the n/u, d/p half-turns
    ("What are the s\u01ddxn\u0279\u0254\u0279oH?", "What are the Horcruxes?"),
    ("What did \u01dd\u0279op\u01ddlq\u026fn\ua4f7 leave?", "What did Dumbledore leave?"),  # a Lisu letter for D
    ("where is u\u0250q\u0250\u029ez\u2200", "where is Azkaban"),
    ("Who is \u0279\u01dd\u0287\u0287o\u0500 \u028e\u0279\u0279\u0250H's wife?", "Who is Harry Potter's wife?"),
    ("\u028d\u0265o \u029e\u0131ll\u01ddp pn\u026fql\u01ddpo\u0279\u01dd?", "who killed dumbledore?"),  # turned in place
])
def test_words_written_upside_down_are_read_upright(disguised, plain):
    assert plain in variants(disguised)


@pytest.mark.parametrize("disguised, plain", [
    ("Owhay illedkay Umbledoreday?", "Who killed Dumbledore?"),
    ("Atwhay isway ethay Amberchay ofway Ecretssay?", "What is the Chamber of Secrets?"),  # "ch" moved as one
    ("Ogwartshay eadmasterhay amenay", "Hogwarts headmaster name"),  # "h" alone: the other reading
    ("Arryhay Otterpay andway ethay Oblet-gay of Ire-fay", "Harry Potter and the Goblet of Fire"),  # hyphenated
])
def test_pig_latin_is_read_back(disguised, plain):
    assert plain in variants(disguised)


@pytest.mark.parametrize("text", ["Today I may play away", "Okay, say it anyway on Sunday"])
def test_words_ending_in_ay_are_not_pig_latin(text):
    assert variants(text) == [text]


def test_base64_that_decodes_to_text_is_read_as_that_text():
    found = variants("Decode this and answer it: V2hvIGlzIEhhcnJ5IFBvdHRlcidzIGJlc3QgZnJpZW5kPw==")
    assert "Decode this and answer it: Who is Harry Potter's best friend?" in found
    # a checksum or an API key is base64 too, of bytes that are not text: no reading of it
    assert all("+qgxVrQFaO/" in found for found in variants(
        "sha256 is n4bQgYhMfWWaL+qgxVrQFaO/TxsrC4Is0V1sFbDwCgg= for the tarball"))


def test_rot13_is_read_where_the_text_names_it():
    found = variants("ROT13, decode and reply: Jub xvyyrq Qhzoyrqber?")
    assert "EBG13, qrpbqr naq ercyl: Who killed Dumbledore?" in found
    assert variants("Jub xvyyrq gur qentba?") == ["Jub xvyyrq gur qentba?"]  # unnamed, only the vocabulary reads it


def test_variants_are_distinct_ordered_and_bounded():
    found = variants("H\u0430rry Dr@co V o l d e m o r t \u0444\u0438\u043b\u043e\u0441\u043e\u0444", limit=3)
    assert len(found) == len(set(found)) <= 3
    assert found[0] == canonical("H\u0430rry Dr@co V o l d e m o r t \u0444\u0438\u043b\u043e\u0441\u043e\u0444")


@pytest.mark.parametrize("text", [
    "Hello! I have 3 cats, an mp3 from 2019 and my 1st car.", "What's the best way to bake sourdough bread?",
    "He said \u201cdon\u2019t\u201d \u2014 then left.", "Explain photosynthesis to a 10-year-old in 3 sentences.",
])
def test_plain_text_is_its_only_variant(text):
    assert variants(text) == [text]


def test_plain_prompts_are_fast():
    prompt = "Could you explain how a barn owl hunts at night, and why its hearing is so good? Thanks a lot."
    runs = 2000
    start = time.perf_counter()
    for _ in range(runs):
        assert variants(prompt) == [prompt]
    per_100_chars = (time.perf_counter() - start) / runs / len(prompt) * 100
    assert per_100_chars < 1e-4  # 0.1 ms per 100 characters (measured: about 0.01 ms)
    long = " ".join(["The river runs past old mills, quiet farms and 3 bridges."] * 200)  # 2,000 words
    best = float("inf")
    for _ in range(5):  # the best of a few runs: other processes share the machine
        start = time.perf_counter()
        variants(long)
        best = min(best, time.perf_counter() - start)
    assert best < 5e-3
