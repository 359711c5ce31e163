"""Service settings, read from NMT_* environment variables (and an optional .env file)."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated

from dotenv import dotenv_values
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from nmt.config import MAX_THREADS
from service.schemas import MAX_TEXTS

_PERIODS = {"s": 1.0, "second": 1.0, "m": 60.0, "minute": 60.0, "h": 3600.0, "hour": 3600.0}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\w+)\s*$")
_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s?#@]+")  # scheme://host[:port], as an Origin header names a site

CommaList = Annotated[list[str], NoDecode]
MAX_TIMEOUT_S = 86_400.0  # a day: a larger timeout (or "inf") passed validation and crashed the startup
MAX_RATE = 1_000_000  # requests per period


# NMT_* names that are not settings of the service: docker-compose's choices and training's collective timeout.
OTHER_NAMES = {"NMT_MODEL", "NMT_WORKERS", "NMT_PUBLISH", "NMT_STOP_GRACE_PERIOD", "NMT_DIST_TIMEOUT"}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NMT_", env_file=".env", extra="ignore", protected_namespaces=())

    model_dir: Path = Field(Path("models/es-en-bible"), description="exported model directory (or run directory)")
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:N or auto")
    threads: int = Field(0, ge=0, le=MAX_THREADS, description="torch CPU threads for the model worker; 0 = torch "
                         "default")
    int8: bool | None = Field(None, description="decoding's matmuls in int8 (CPU only); false: fp32; unset: the "
                              "model config's decode.int8 (on) on a CPU with VNNI")
    max_batch_tokens: int = Field(4000, ge=1, description="source tokens decoding at once (and target tokens scored "
                                  "per step), shared by the running requests")
    max_batch_requests: int = Field(32, ge=1, description="requests in the running batch; 1 turns batching off")
    max_wait_ms: float = Field(300.0, ge=0, le=MAX_TIMEOUT_S * 1000, allow_inf_nan=False,
                               description="while a batch of n requests decodes, others join it at most "
                               "every max_wait_ms * n / max_batch_requests (those arriving meanwhile join together, "
                               "one encoder pass); 0 = at the next step")
    max_queue: int = Field(256, ge=1, description="requests waiting for the model before new ones get 503")
    max_texts: int = Field(64, ge=1, le=MAX_TEXTS, description="texts per request (413 above)")
    max_chars: int = Field(2000, ge=1, description="characters per text (413 above)")
    max_body_bytes: int = Field(1_000_000, ge=1, description="request body size (413 above)")
    max_alignment_cells: int = Field(1_000_000, ge=1, description="with return_alignment: attention weights a "
                                     "request may return, bounded before decoding as each text's source pieces x "
                                     "its longest possible translation (413 above)")
    request_timeout_s: float = Field(30.0, gt=0, le=MAX_TIMEOUT_S, allow_inf_nan=False,
                                     description="per-request deadline, one for the body to arrive (408) "
                                     "and the answer (504) together")
    header_timeout_s: float = Field(10.0, gt=0, le=MAX_TIMEOUT_S, allow_inf_nan=False,
                                    description="time a request's headers may take to arrive, from the "
                                    "connection's opening (from its first byte for a connection's later requests): "
                                    "408, and the connection closed; one on which no request begins, or that only "
                                    "trickles bytes between requests, is closed silently")
    send_timeout_s: float = Field(30.0, gt=0, le=MAX_TIMEOUT_S, allow_inf_nan=False,
                                  description="once over 64 KiB of an answer waits to be sent, the "
                                  "time its client has to read it down under 16 KiB (uvicorn's flow control) before "
                                  "the connection is dropped, as with nginx's send_timeout")
    max_header_bytes: int = Field(32_768, ge=1024, description="size of a request's line and headers together: "
                                  "431 above, and the connection closed")
    api_keys: CommaList = Field(default_factory=list, description="comma-separated keys of visible ASCII characters, "
                                "sent as X-API-Key: KEY or Authorization: Bearer KEY; empty = no auth")
    rate_limit: str = Field("", description="per API key (or client IP) limit like 60/minute, on translate and "
                            "score; a request without a valid key counts against its client IP's; empty = off")
    cors_origins: CommaList = Field(default_factory=list, description="comma-separated origins allowed by CORS "
                                    "(scheme://host[:port], or *); empty = none (a preflight gets 405)")

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            parts = [part.strip() for part in value.split(",") if part.strip()]
            if value and not parts:  # "," or " ": meant as keys, it would leave the service open
                raise ValueError(f"holds no entry, only commas or spaces ({value!r}): leave it empty, or give "
                                 "comma-separated entries")
            return parts
        return value

    @field_validator("int8", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        """NMT_INT8= (an .env line, or compose passing an empty variable) means unset, as for the list settings."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("api_keys")
    @classmethod
    def _check_keys(cls, keys: list[str]) -> list[str]:
        """Keys of visible ASCII characters: a header carries other characters as bytes that clients encode
        differently (a browser as Latin-1, curl as UTF-8), so such a key matched for some clients and not others."""
        for number, key in enumerate(keys, 1):
            other = next((c for c in key if not "!" <= c <= "~"), None)
            if other is not None:  # the key itself stays out of the message: it is a secret
                raise ValueError(f"key {number} holds U+{ord(other):04X}, which is not a visible ASCII character: "
                                 "use letters, digits and punctuation")
        return keys

    @field_validator("cors_origins")
    @classmethod
    def _check_origins(cls, origins: list[str]) -> list[str]:
        """Origins as browsers send them: scheme://host[:port], in lower case, without a path (or *)."""
        checked = []
        for origin in origins:
            origin = origin.lower().removesuffix("/")
            # Browsers leave a scheme's default port out of Origin.
            origin = re.sub(r"^(https://[^/]+):443$|^(http://[^/]+):80$", lambda m: m[1] or m[2], origin)
            if origin != "*" and not _ORIGIN.fullmatch(origin):
                raise ValueError(f"{origin!r} is not an origin: give scheme://host[:port], such as "
                                 "https://app.example.com, or *")
            checked.append(origin)
        return checked

    @field_validator("rate_limit")
    @classmethod
    def _check_rate(cls, value: str) -> str:
        if value.strip():
            parse_rate(value)
        return value.strip()

    def rate(self) -> tuple[int, float] | None:
        """The rate limit as (requests, period in seconds), or None when off."""
        return parse_rate(self.rate_limit) if self.rate_limit else None


def parse_rate(text: str) -> tuple[int, float]:
    """Parse `N/period` (period: second, minute, hour or s, m, h) into (N, seconds)."""
    match = _RATE.match(text)
    if not match or match.group(2).lower() not in _PERIODS or not 1 <= int(match.group(1)) <= MAX_RATE:
        raise ValueError(f"rate limit must look like 60/minute (periods: second, minute, hour; 1 to {MAX_RATE} "
                         f"requests), got {text!r}")
    return int(match.group(1)), _PERIODS[match.group(2).lower()]


def unknown_names(environ: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """NMT_* variables the service does not know, each with the setting it may have meant (else None): a misspelt
    NMT_API_KEY would otherwise leave the service open without a word."""
    known = sorted(name.upper() for name in Settings.model_fields)
    # pydantic-settings matches names in any case: NMT_model_dir is NMT_MODEL_DIR.
    names = {n.upper() for n in environ if n.upper().startswith("NMT_")}
    found = []
    for name in sorted(names - {f"NMT_{k}" for k in known} - OTHER_NAMES):
        close = difflib.get_close_matches(name.removeprefix("NMT_"), known, n=1)  # the shared prefix is no likeness
        found.append((name, f"NMT_{close[0]}" if close else None))
    return found


def env_file_variables() -> dict[str, str]:
    """The variables of the .env file that Settings reads (in the current directory), by upper-case name: pydantic
    matches names in any case."""
    path = Path(str(Settings.model_config["env_file"]))
    return {name.upper(): value or "" for name, value in dotenv_values(path).items()} if path.is_file() else {}


def describe(settings: Settings) -> str:
    """What guards the service, for its startup log: keys, rate limit, CORS."""
    keys = f"{len(settings.api_keys)} API key(s)" if settings.api_keys else "no API keys (open to all)"
    rate = f"rate limit {settings.rate_limit}" if settings.rate_limit else "no rate limit"
    cors = f"CORS for {', '.join(settings.cors_origins)}" if settings.cors_origins else "no CORS origins"
    return f"{keys}, {rate}, {cors}"
