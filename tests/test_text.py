"""Sentence splitting (nmt.text.split_sentences): what the Translator decodes as separate segments."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nmt.text import split_sentences


@pytest.mark.parametrize("line, sentences", [
    ("El Señor es mi pastor. Nada me faltará.", ["El Señor es mi pastor.", "Nada me faltará."]),
    ("Jesús lloró.  Dios es amor.", ["Jesús lloró.", "Dios es amor."]),
    ("¿Quién eres? ¡Ay! «Ven.» Él vino…  Y se fue", ["¿Quién eres?", "¡Ay!", "«Ven.»", "Él vino…", "Y se fue"]),
    ('He said "Go." (Then he left.) Amen.', ['He said "Go."', "(Then he left.)", "Amen."]),
    # Not sentence ends: a lower-case word next, an initial, an abbreviation before a name, no space.
    ("uno. dos; tres: Cuatro", ["uno. dos; tres: Cuatro"]),
    ("J. R. R. Tolkien wrote it.", ["J. R. R. Tolkien wrote it."]),
    ("El Sr. García y la Dra. Ruiz. Mr. Smith", ["El Sr. García y la Dra. Ruiz.", "Mr. Smith"]),
    ("Vive en EE. UU. desde 1990. Trabaja para la U.S. Army y Ud. lo sabe. Bien.",
     ["Vive en EE. UU. desde 1990.", "Trabaja para la U.S. Army y Ud. lo sabe.", "Bien."]),
    ("Llegó a las 5 p.m. Luego se fue. Es de la ONU. Bien.",  # an abbreviation may end a sentence: not split there
     ["Llegó a las 5 p.m. Luego se fue.", "Es de la ONU.", "Bien."]),
    ("Fue en el siglo XX. Después vino la guerra. Murieron 1.500. Luego subió a 3.5. Ver example.com. Fin.",
     ["Fue en el siglo XX.", "Después vino la guerra.", "Murieron 1.500.", "Luego subió a 3.5.", "Ver example.com.",
      "Fin."]),
    ("World War II. Then the U.S.A. Army came. Vive en EE. UU. Trabaja.",  # a sentence may end in EE. UU.
     ["World War II.", "Then the U.S.A. Army came.", "Vive en EE. UU.", "Trabaja."]),
    # No space: a capitalised word after a lower-case letter and the mark, as where copying lost the space (the
    # model translated "lloró.Dios" as one word), or a zero-width space; not in names and numbers.
    ("1.5 millones.Fin", ["1.5 millones.", "Fin"]),
    ("Jesús lloró.Dios es amor.¿Quién?\u200bYo", ["Jesús lloró.", "Dios es amor.", "¿Quién?", "Yo"]),
    ("ASP.NET y U.S.A y 1.5.Fin y Sr.García y e.DIOS", ["ASP.NET y U.S.A y 1.5.Fin y Sr.García y e.DIOS"]),
    ("Llama a Console.WriteLine en www.google.Com.mx", ["Llama a Console.WriteLine en www.google.Com.mx"]),
    # Scripts without case: a letter of one starts a sentence; the full-width marks need no space after them.
    ("你好。我很好。", ["你好。", "我很好。"]),
    ("他说：「走。」然后走了！对吗？对。", ["他说：「走。」", "然后走了！", "对吗？", "对。"]),
    ("今日は晴れです。明日は雨でしょう。", ["今日は晴れです。", "明日は雨でしょう。"]),
    ("مرحبا بك. كيف حالك؟ أنا بخير۔ شكرا", ["مرحبا بك.", "كيف حالك؟", "أنا بخير۔", "شكرا"]),
    ("नमस्ते। आप कैसे हैं?", ["नमस्ते।", "आप कैसे हैं?"]),
    ("שלום. מה שלומך?", ["שלום.", "מה שלומך?"]),
    ("Vive en 中国. Trabaja. ok. 中文", ["Vive en 中国.", "Trabaja. ok.", "中文"]),
    ("第一。2024年。uno. dos", ["第一。2024年。uno. dos"]),  # not before a digit or a lower-case letter
    # A quotation a particle continues is no sentence end; a modifier letter starts none.
    ("「行きます。」と言った。「本当！？」って驚いた。はい。",
     ["「行きます。」と言った。", "「本当！？」って驚いた。", "はい。"]),
    ("Aloha. ʻo ia. fin. ˈsílaba. ok. ǅungla.", ["Aloha. ʻo ia. fin. ˈsílaba. ok. ǅungla."]),
    ("見た。ーっと", ["見た。ーっと"]),
    ("안녕하세요. 잘 지내요?", ["안녕하세요.", "잘 지내요?"]),
    ("...", ["..."]),
    ("", [""]),
])
def test_sentences_end_before_a_capital_or_a_letter_without_case(line, sentences):
    parts = split_sentences(line)
    assert parts[::2] == sentences
    assert "".join(parts) == line


@settings(deadline=None)  # no timing: a loaded CI machine took past hypothesis's 200 ms
@given(st.text(alphabet=st.sampled_from(list("aBb .!?¿¡«»\"()\n\t…\u200b。中")), max_size=60))
def test_splitting_loses_nothing(line):
    parts = split_sentences(line)
    assert "".join(parts) == line and len(parts) % 2 == 1
    assert all(not space.replace("\u200b", " ").strip() for space in parts[1::2])
    for s, space, n in zip(parts[::2], parts[1::2], parts[2::2], strict=False):  # no space: a mark, then a word
        mark, word = s.rstrip("\"'»)")[-1:], n.lstrip("\"'«(¿¡")[:2]
        glued = mark in ".!?…" and word[:1] == "B" and word[1:].islower()  # a capitalised word: "lloró.Dios"
        assert space or glued or mark == "。" and word[:1] in "B中", (s, n)
    sentences = parts[::2]  # the whitespace between two sentences is all in the part between them
    assert all(s == s.rstrip() for s in sentences[:-1]) and all(s == s.lstrip() for s in sentences[1:])


def test_glued_sentences_are_translated_apart_with_a_space_between():
    # "lloró.Dios" came out as "wept.God": the empty gap was kept as it was.
    from nmt.translator import _interleaved

    plan = _interleaved(split_sentences("Jesús lloró.Dios es amor.\u200bY vio.  Fin."), lambda part: [part.upper()])
    assert plan == ["JESÚS LLORÓ.", " ", "DIOS ES AMOR.", " ", "Y VIO.", "  ", "FIN."]
