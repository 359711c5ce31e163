"""The model that ships in models/es-en-bible: it loads, translates Bible Spanish into English, deterministically."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import sacrebleu

from nmt.translator import Translator

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "es-en-bible"

# Test-split verses (Reina-Valera 1909, public domain): Ruth 1:1, Esth 1:15, Lam 3:4, Phil 2:5, 1Pet 3:2.
VERSES = [
    "Y ACONTECIÓ en los días que gobernaban los jueces, que hubo hambre en la tierra. Y un varón de Beth-lehem "
    "de Judá, fué á peregrinar en los campos de Moab, él y su mujer, y dos hijos suyos.",
    "Qué se había de hacer según la ley con la reina Vasthi, por cuanto no había cumplido la orden del rey "
    "Assuero, enviada por mano de los eunucos.",
    "Hizo envejecer mi carne y mi piel; quebrantó mis huesos.",
    "Haya, pues, en vosotros este sentir que hubo también en Cristo Jesús:",
    "Considerando vuestra casta conversación, que es en temor.",
]
ENGLISH_WORDS = {"the", "and", "of", "in", "my", "which", "that", "he", "was", "is", "his", "with", "to", "a"}
SPANISH_WORDS = {"los", "las", "el", "la", "que", "y", "en", "de", "por", "mi"} - ENGLISH_WORDS


@pytest.fixture(scope="module")
def translator() -> Translator:
    return Translator.load(MODEL, threads=1)


def test_the_shipped_model_is_small_enough_to_commit() -> None:
    size = sum(f.stat().st_size for f in MODEL.iterdir())
    assert size < 25 * 2**20, f"{MODEL} is {size / 2**20:.1f} MiB"


def test_translations_are_nonempty_english_and_deterministic(translator: Translator) -> None:
    first = [t.text for t in translator.translate(VERSES, beam_size=5)]
    words = [re.findall(r"[a-z]+", text.lower()) for text in first]
    assert all(len(w) >= 3 for w in words), first
    tokens = [w for ws in words for w in ws]
    english = sum(w in ENGLISH_WORDS for w in tokens)
    spanish = sum(w in SPANISH_WORDS for w in tokens)
    assert english >= 0.15 * len(tokens) and spanish < english / 3, first
    assert not any(re.search("[áéíóúñ¿¡]", text) for text in first), first
    again = [t.text for t in Translator.load(MODEL, threads=1).translate(VERSES, beam_size=5)]
    one_by_one = [translator.translate([v], beam_size=5)[0].text for v in VERSES]
    assert first == again == one_by_one


def test_the_card_reports_how_the_model_was_made(translator: Translator) -> None:
    card = translator.info["card"]
    assert card["languages"] == {"src": "es", "tgt": "en"}
    assert card["data"]["counts"] == {"train": 29533, "dev": 673, "test": 878}


def test_test_bleu_is_at_least_25(translator: Translator, tmp_path: Path) -> None:
    data = ROOT / "data" / "bible"
    if not (data / "test.src").exists():
        from nmt.corpus import prepare_bible

        data = tmp_path / "bible"
        prepare_bible(data)
    src = (data / "test.src").read_text(encoding="utf-8").splitlines()
    ref = (data / "test.tgt").read_text(encoding="utf-8").splitlines()
    hyp = [t.text for t in translator.translate(src, beam_size=5)]
    assert sacrebleu.corpus_bleu(hyp, [ref]).score >= 25
