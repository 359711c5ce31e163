"""Text normalization shared by corpus preparation and translation, so that a model sees at inference the kind
of text it was trained on."""

from __future__ import annotations

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
