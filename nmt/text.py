"""Text normalization shared by corpus preparation and translation, so that a model sees at inference the kind
of text it was trained on."""

from __future__ import annotations

import re
import unicodedata

# Invisible characters that carry no text: byte order mark / zero-width no-break space, zero-width space, soft
# hyphen, word joiner and invisible operators, and the bidirectional marks and overrides (which reorder how text is
# shown, not what it says). Zero-width joiners and non-joiners stay: some scripts spell with them.
_INVISIBLE = dict.fromkeys([0xFEFF, 0x200B, 0x00AD, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2060, 0x2065),
                            *range(0x2066, 0x206A)])


def normalize_text(text: str) -> str:
    """Unicode NFC, invisible and control characters removed (tabs, newlines and other breaks become spaces),
    whitespace runs collapsed to one space, stripped."""
    text = unicodedata.normalize("NFC", text).translate(_INVISIBLE)
    if not text.isprintable():
        text = "".join(
            " " if ch.isspace() else ch
            for ch in text
            if ch.isspace() or unicodedata.category(ch) != "Cc"
        )
    return " ".join(text.split())


# A sentence ends at . ! ? or … (and the quotes or brackets that close there) before whitespace and an upper-case
# letter (after opening quotes or brackets, and the inverted marks that open Spanish questions and exclamations),
# except at the period of an abbreviation: after a single capital (an initial), short runs of letters joined by
# periods (U.S., S.A., p.m.; not 1.500, 3.5 or example.com), a doubled capital before another (Spanish plurals:
# EE. UU., FF. AA.; not the Roman numerals of "siglo XX. Después") or one of these words that precede names.
# A zero-width space counts as whitespace here. Without any, a sentence ends where a lower-case letter and the mark
# come before a capitalised word ("lloró.Dios": a space lost in copying, which the model would translate as one
# word), but not inside "ASP.NET", "U.S.A" or "1.5.Fin".
# Scripts without case (Chinese, Japanese, Korean, Arabic, Hebrew, Devanagari, ...) have no capitals to look for:
# a letter of such a script starts a sentence as a capital does, the Arabic question mark, the Urdu full stop and
# the Devanagari danda end one as a period does, and the full-width 。！？ end one with no space after them, as
# Chinese and Japanese text has it, except inside a quotation that a particle continues (「行きます。」と言った。).
# Thai, which marks no sentence end, stays one segment.
_SENTENCE_BREAK = re.compile(r"[.!?…؟۔।。！？][\"'»›”’)\]}」』）】〉》]*([\s\u200b]*)")
_OPENERS = "\"'«‹“‘„([{¿¡—–-「『（【〈《"
_WIDE_MARKS = "。！？"
_QUOTE_ENDS = "」』"
_TITLES = frozenset("mr mrs ms dr prof sr sra srta dra st mt jr rev gen col capt lt sgt hon fr sto sta ud uds vd "
                    "vds dña lic ing arq av avda".split())
_DOTTED = re.compile(r"(?:[^\W\d_]{1,4}\.)+[^\W\d_]{1,4}\.?")


def _doubled_capital(word: str) -> bool:
    word = word.rstrip(".")
    return len(word) == 2 and word.isupper() and word[0] == word[1]


def _is_abbreviation(word: str, after: str) -> bool:
    """Whether a word that a period follows is an abbreviation (see _SENTENCE_BREAK); after: the text next."""
    bare = word.rstrip(".")
    return (len(bare) == 1 and bare.isupper() or _DOTTED.fullmatch(word) is not None
            or _doubled_capital(word) and _doubled_capital(after.split(maxsplit=1)[0] if after.strip() else "")
            or bare.lower() in _TITLES)


def _glued(line: str, mark: int, end: int) -> bool:
    """Whether a sentence mark at `mark`, with no space up to `end`, ends a sentence (see _SENTENCE_BREAK)."""
    rest = line[end:].lstrip(_OPENERS)
    word = re.match(r"[^\W\d_]*", rest)[0]
    # Not before a name in CamelCase (Console.WriteLine) or one dotted further (google.Com.mx).
    dotted = rest[len(word):len(word) + 2][:1] == "." and rest[len(word) + 1:len(word) + 2].isalpha()
    return (mark > 0 and line[mark - 1].islower() and word[:1].isupper() and len(word) > 1 and word[1:].islower()
            and not dotted)


def _starts_sentence(text: str) -> bool:
    """Whether text begins as a sentence does (see _SENTENCE_BREAK): with a capital, or a letter without case."""
    first = text[:1]
    # Not modifier letters (the ʻokina, IPA's stress mark, Japanese ー) nor titlecase digraphs: they follow a period
    # in lower-case text too.
    return first.isupper() or first != "" and unicodedata.category(first) == "Lo" and not first.islower()


def split_sentences(line: str) -> list[str]:
    """A line as its sentences and the whitespace between them, alternately (sentence, space, sentence, ...)."""
    parts, start = [], 0
    for match in _SENTENCE_BREAK.finditer(line):
        wide = line[match.start()] in _WIDE_MARKS
        if not match.group(1) and not wide and not _glued(line, match.start(), match.end()):
            continue
        quoted = not match.group(1) and line[match.start(1) - 1] in _QUOTE_ENDS
        if quoted and "\u3041" <= line[match.end():match.end() + 1] <= "\u309f":  # hiragana: と, って
            continue
        head, after = line[start:match.start(1)], line[match.end():].lstrip(_OPENERS)
        word = head.rsplit(maxsplit=1)[-1].lstrip(_OPENERS) if head.strip() else ""
        if not _starts_sentence(after) or head.endswith(".") and _is_abbreviation(word, after):
            continue
        parts += [head, match.group(1)]
        start = match.end()
    parts.append(line[start:])
    return parts
