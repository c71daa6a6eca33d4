"""The vocabulary stage: the target's terms as sure signs, minus those the retain side also uses."""
from __future__ import annotations

import pytest

from classifier.vocabulary import TYPO_MAX_WORDS, TermMatcher

pytestmark = pytest.mark.unit

TERMS = ["Hogwarts", "Expelliarmus", "Dobby", "Whomping Willow", "Hermione", "Hermiona", "霍格沃茨", "Goblet of Fire"]


@pytest.fixture(scope="module")
def matcher() -> TermMatcher:
    return TermMatcher(TERMS).fit(["A dobby loom weaves patterns.", "Leontes accuses Hermione in The Winter's Tale."])


def test_terms_a_retain_text_uses_are_dropped_and_typos_are_not_allowed_near_them(matcher):
    assert matcher.dropped_terms_ == {"Dobby": 1, "Hermione": 1}
    assert "Dobby" not in matcher.terms_ and "Hogwarts" in matcher.terms_
    # "Hermione" is one letter from the Polish "Hermiona": kept as a term, but not matched through a typo
    assert "Hermiona" in matcher.terms_ and "Hermiona" not in matcher.typo_terms_
    assert matcher.find("Who was Hermione Lee?") is None and matcher.find("Kim jest Hermiona?") == "Hermiona"


@pytest.mark.parametrize("text, term", [
    ("Tell me about hogwarts.", "Hogwarts"),  # case
    ("The tree that attacks the car is the whomping-willow", "Whomping Willow"),  # hyphen for space
    ("Why are Whomping Willows dangerous?", "Whomping Willow"),  # plural of the last word
    ("what does expeliarmus do", "Expelliarmus"),  # one letter missing
    ("Is Hgowarts in Scotland?", "Hogwarts"),  # two neighbouring letters swapped
    ("the whompping willow", "Whomping Willow"),  # a long word of a longer term mistyped
    ("Gobelt of Fire ending", "Goblet of Fire"),
    ("H0gw@rts", "Hogwarts"),  # leetspeak, through the normalised readings
    ("H-o-g-w-a-r-t-s", "Hogwarts"),  # letter spacing
    ("Jung vf Ubtjnegf?", "Hogwarts"),  # ROT13
    ("strawgoH", "Hogwarts"),  # reversed
    ("Is Hgwrts in Scotland?", "Hogwarts"),  # vowels left out
    ("the Whmpng Wllw", "Whomping Willow"),
    ("Tell me about Whmpng Willow", "Whomping Willow"),  # one word without them is enough
    ("Owhay oundedfay Ogwartshay?", "Hogwarts"),  # Pig Latin, through the normalised readings
    ("我想去霍格沃茨上学", "霍格沃茨"),  # unspaced script: a substring
])
def test_readings_and_forms_that_name_a_term(matcher, text, term):
    assert matcher.find(text) == term


@pytest.mark.parametrize("text", [
    "Dobby weave shirts are nice.",  # dropped: a retain text uses it
    "Hogwartsian architecture",  # a longer word is another word
    "The hog warts were treated.",  # words split differently
    "Expelliar",  # too far from the term
    "Hgowrats",  # two swaps: too far
    "Goblet of Fyre",  # "fire" is too short for a typo
    "the whompping willlow",  # one typo per term
    "the willow tree",
    "Whimping Wallow",  # the same consonants, but no word typed without vowels
    "HGWRT",  # a letter short
])
def test_texts_that_name_no_term(matcher, text):
    assert matcher.find(text) is None


def test_a_saved_fit_matches_the_same(matcher):
    loaded = TermMatcher.fitted(matcher.terms_, matcher.typo_terms_, matcher.dropped_terms_)
    for text in ["Tell me about hogwarts.", "what does expeliarmus do", "Who was Hermione Lee?", "Dobby weave"]:
        assert loaded.find(text) == matcher.find(text)


def test_a_retain_word_without_vowels_stops_a_term_matching_without_them():
    matcher = TermMatcher(["Voldemort", "Hogwarts"]).fit(["The VLDMRT valve sits next to the pump."])
    assert matcher.find("Who is Vldmrt?") is None and matcher.find("Is Hgwrts in Scotland?") == "Hogwarts"
    assert matcher.find("Who is Voldemort?") == "Voldemort"


def test_an_ordinary_word_is_never_read_as_a_typo_of_a_term():
    ordinary = ["carrots", "gallows", "hollow", "the"]
    matcher = TermMatcher(["the Carrows", "Deathly Hallows", "Whomping Willow", "Expelliarmus"], ordinary).fit([])
    assert matcher.find("peel the carrots") is None and matcher.find("the Carrows") == "the Carrows"
    assert matcher.find("the carows") == "the Carrows"  # not a word of the lexicon: a typo of the term
    assert matcher.find("deathly gallows") is None and matcher.find("deathly hollows") is None  # inflected
    assert matcher.find("what are the deathly halows") == "Deathly Hallows"
    assert matcher.find("the whomping wilow") == "Whomping Willow"
    loaded = TermMatcher.fitted(matcher.terms_, matcher.typo_terms_, matcher.dropped_terms_, ordinary)
    assert loaded.find("deathly gallows") is None and loaded.find("deathly halows") == "Deathly Hallows"


def test_a_phrase_with_one_typo_is_found_however_many_terms_share_its_words():
    shared = [f"Deathly Hallows part {n}" for n in range(1, 9)] + [f"Harry Potter and the {w}" for w in
                                                                   ("Deathly Hallows", "Goblet of Fire", "Half-Blood Prince")]
    matcher = TermMatcher([*shared, "Deathly Hallows", "Sirius Black", "Regulus Black", "Black Lake"]).fit([])
    assert matcher.find("what are the deathly halows") == "Deathly Hallows"
    assert matcher.find("what are the deathy hallows") == "Deathly Hallows"
    assert matcher.find("why is sirus black in prison") == "Sirius Black"
    assert matcher.find("harry poter and the goblet of fire") == "Harry Potter and the Goblet of Fire"
    assert matcher.find("the black lake") == "Black Lake" and matcher.find("a black cat") is None


def test_a_long_text_names_a_term_only_as_written():
    matcher = TermMatcher(["Grunnings", "Obscurus"]).fit([])
    filler = "the weather was mild and the river ran slow " * (TYPO_MAX_WORDS // 9 + 1)
    assert matcher.find(f"{filler} Mr Gunnings kept the shop.") is None  # a surname one letter from a term
    assert matcher.find(f"{filler} they said obscurum in Latin.") is None
    assert matcher.find(f"{filler} Mr Dursley worked at Grunnings.") == "Grunnings"  # as written, any length
    assert matcher.find("Mr Gunnings kept the shop.") == "Grunnings"  # a short prompt's typo still counts
    # a retain text of any length that has a word one typo from a term rules out typos of it everywhere
    fitted = TermMatcher(["Grunnings", "Obscurus"]).fit([f"{filler} Mr Gunnings kept the shop."])
    assert fitted.typo_terms_ == ["Obscurus"] and fitted.find("Mr Gunnings kept the shop.") is None


def test_cyrillic_terms_are_found_in_any_case_ending_and_nothing_shorter_joins_them():
    matcher = TermMatcher(["Гарри Поттер", "Таємна кімната", "Рон Уізлі", "Принц-полукровка"]).fit([])
    assert matcher.find("Какое заклинание знал Гарри Поттера отец?") == "Гарри Поттер"  # genitive
    assert matcher.find("Хто відкрив Таємну кімнату?") == "Таємна кімната"  # accusative, both words
    assert matcher.find("Хто батьки Рона Уізлі?") == "Рон Уізлі"
    assert matcher.find("Кто такой Принц-полукровка?") == "Принц-полукровка"
    assert matcher.find("Поттеры жили в Годриковой впадине") is None  # one word of a two-word term
    assert matcher.find("Рональд Рейган") is None  # "рон" is a stem of three letters: no longer word ends in it
    assert matcher.find("Harry Potters") is None  # Latin words keep their endings
