"""Run the service under uvicorn (the `nmt serve` command)."""

from __future__ import annotations

import os

import uvicorn
from pydantic import ValidationError

from nmt.errors import NMTError
from service.settings import Settings


def serve(model: str | None = None, host: str = "127.0.0.1", port: int = 8000, workers: int = 1) -> None:
    """Serve `model` (default: NMT_MODEL_DIR) until SIGINT/SIGTERM; each worker process loads its own copy.

    Settings travel to the workers through the environment, so MODEL is exported as NMT_MODEL_DIR. On SIGTERM
    uvicorn stops accepting connections and finishes the requests in flight before the model is unloaded.
    """
    if model is not None:
        os.environ["NMT_MODEL_DIR"] = model
    try:
        settings = Settings()
    except ValidationError as exc:
        raise NMTError(f"invalid NMT_* setting: {exc}") from None
    if not settings.model_dir.exists():
        raise NMTError(f"model not found: {settings.model_dir}")
    if workers < 1:
        raise NMTError(f"--workers must be >= 1, got {workers}")
    uvicorn.run("service.app:create_app", factory=True, host=host, port=port, workers=workers,
                timeout_graceful_shutdown=None)
