"""Request and response bodies of the HTTP API (they also make the OpenAPI schema at /docs)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from nmt.config import MAX_LENGTH_PENALTY

MAX_BEAM = 16
# JSON may escape lone surrogates ("\\ud800"), which cannot be encoded for the tokenizer: they become U+FFFD, as
# invalid UTF-8 does when decoded leniently. Control and invisible characters are the Translator's to remove (as
# the CLI's input: nmt.text).
_SURROGATES = dict.fromkeys(range(0xD800, 0xE000), "\ufffd")


def clean_text(text: str) -> str:
    """Lone surrogates become U+FFFD."""
    return text.translate(_SURROGATES)


Text = Annotated[str, AfterValidator(clean_text)]
# The most texts a request can hold, whatever NMT_MAX_TEXTS allows: a longer list is refused (413) before its items
# are validated, as validating and reporting 150,000 bad items held the event loop for seconds.
MAX_TEXTS = 10_000
TOO_MANY_TEXTS = "too_many_texts"  # the error type it raises (the service answers it 413)


def _not_too_long(value: Any) -> Any:
    """Refuse a list over MAX_TEXTS before its items are validated (a check, not a schema constraint: the limit
    users meet is NMT_MAX_TEXTS, answered 413)."""
    if isinstance(value, list) and len(value) > MAX_TEXTS:
        raise PydanticCustomError(TOO_MANY_TEXTS, "at most {max_length} texts, got {actual_length}",
                                  {"max_length": MAX_TEXTS, "actual_length": len(value)})
    return value


Texts = Annotated[list[Text], BeforeValidator(_not_too_long)]


class _Request(BaseModel):
    # strict: "5" is not a beam size and "yes" is not a boolean; unknown fields are typos, not options
    model_config = ConfigDict(extra="forbid", strict=True)


class TranslateRequest(_Request):
    text: Text | Texts = Field(description="one text or a list of texts; each is split into sentences, "
                                  "translated, and joined back with its whitespace",
                                  examples=["En el principio creó Dios los cielos y la tierra."])
    beam_size: int | None = Field(None, ge=1, le=MAX_BEAM, description="beam width; default: the model's, or n_best "
                                  "when that is larger")
    n_best: int = Field(1, ge=1, le=MAX_BEAM, description="translations per text (best first); at most beam_size")
    length_penalty: float | None = Field(None, ge=0.0, le=MAX_LENGTH_PENALTY, allow_inf_nan=False,
                                         description="GNMT length penalty alpha; default: the model's")
    return_alignment: bool = Field(False, description="include source/target pieces and the attention matrix")
    return_scores: bool = Field(True, description="include model scores (length-normalized log-probabilities)")

    @field_validator("n_best")
    @classmethod
    def _n_best_within_beam(cls, value: int, info: ValidationInfo) -> int:
        beam = info.data.get("beam_size")
        if beam is not None and value > beam:
            raise ValueError(f"n_best ({value}) must not exceed beam_size ({beam})")
        return value


class ScoreRequest(_Request):
    source: Text = Field(description="the source text", examples=["En el principio"])
    candidates: Texts = Field(description="candidate translations of the source to score",
                                  examples=[["In the beginning", "At the start"]])


class Alternative(BaseModel):
    text: str
    score: float | None = None


class Alignment(BaseModel):
    source: list[str] = Field(description="source subword pieces")
    target: list[str] = Field(description="target subword pieces (end of sentence last)")
    weights: list[list[float]] = Field(description="attention weights: one row per target piece over source pieces")


class Translation(BaseModel):
    text: str
    score: float | None = Field(None, description="length-normalized log-probability, normalized over the model's "
                                "lexical shortlist when it has one (models[].shortlist), so above what /v1/score "
                                "gives over the whole vocabulary; null without return_scores and for a text with "
                                "nothing to translate")
    alternatives: list[Alternative] = Field(default_factory=list, description="the other n-best translations")
    alignment: Alignment | None = None


class TranslateResponse(BaseModel):
    translations: list[Translation]
    model: str
    elapsed_ms: float


class Score(BaseModel):
    text: str
    pieces: list[str] = Field(description="target pieces of the candidate, end of sentence last")
    logprob: float = Field(description="total log-probability of the candidate, end of sentence included, over the "
                                       "whole target vocabulary")
    token_logprobs: list[float] = Field(description="log-probability of each target piece")


class ScoreResponse(BaseModel):
    scores: list[Score]
    model: str
    elapsed_ms: float


class ModelInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str = Field(description="the model's name, as in every answer's `model`")
    name: str | None = Field(None, description="the same as id")
    src_lang: str | None = Field(None, description="source language code")
    tgt_lang: str | None = Field(None, description="target language code")
    parameters: int | None = Field(None, description="trainable parameters")
    int8: bool | None = Field(None, description="decoding's matmuls in int8 (NMT_INT8, decode.int8)")
    device: str | None = Field(None, description="torch device the model runs on")
    max_len: int | None = Field(None, description="pieces a source or candidate of /v1/score may hold (413 above); "
                                "longer texts to translate are split")
    decode: dict[str, Any] | None = Field(None, description="decoding defaults (the model config's decode section: "
                                          "beam_size, length_penalty, ...)")
    shortlist: bool | None = Field(None, description="decoding over the model's lexical shortlist")
    weights_sha256: str | None = Field(None, description="SHA-256 of the weights file")
    step: int | None = Field(None, description="training updates of the weights")
    card: dict[str, Any] | None = Field(None, description="the model card (card.json): data, training, test BLEU")


class Limits(BaseModel):
    """What a request may hold and take (the service's settings), so that clients can check before sending."""
    max_texts: int = Field(description="texts per request")
    max_chars: int = Field(description="characters per text")
    max_body_bytes: int = Field(description="request body size")
    max_beam_size: int = Field(description="largest beam_size (and n_best)")
    max_alignment_cells: int = Field(description="with return_alignment: attention weights a request may return, "
                                     "counted before decoding as each text's source pieces x its longest possible "
                                     "translation")
    request_timeout_s: float = Field(description="the deadline of a request, body and answer together")


class ModelsResponse(BaseModel):
    models: list[ModelInfo]
    limits: Limits


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    status: str
    model: str  # the served model's id


class FieldError(BaseModel):
    field: str
    message: str


class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable error kind, e.g. validation_error, too_large, rate_limited")
    message: str = Field(description="what went wrong, for people")
    fields: list[FieldError] = Field(default_factory=list, description="the offending request fields, if any")


class ErrorResponse(BaseModel):
    error: ErrorDetail
