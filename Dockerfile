# rnnsearch: the translation service (default target `serve`) and a training image (target `train`).
#
#   docker build -t rnnsearch .                            # the service, with the shipped es->en model
#   docker run --rm -p 8000:8000 rnnsearch
#   docker build --target train -t rnnsearch-train .       # adds the Bible corpus packages for `nmt prepare bible`
#
# docker-compose.yml builds each stage for its service (`docker-compose up -d translate` builds the service's).

FROM python:3.11-slim-bookworm AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    MPLCONFIGDIR=/tmp/matplotlib

# tini as PID 1: the kernel drops a signal PID 1 has no handler for, so `docker stop` during start-up (loading
# the model, preparing a corpus) waited out the grace period for SIGKILL, and a drained service exited 0, not 143.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*
ENTRYPOINT ["/usr/bin/tini", "--"]

# The CPU build of torch first, in its own layer: a bare `torch` requirement would pull several GB of CUDA
# libraries, and the project's `torch>=2.2` is then already satisfied.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /app
COPY pyproject.toml README.md constraints.txt ./
COPY nmt/ nmt/
COPY service/ service/
# The dependencies' versions the tests passed with, not whatever PyPI has newest on the day of the build.
RUN pip install -c constraints.txt . && rm -rf build ./*.egg-info
COPY configs/ configs/
# COPY keeps the checkout's file modes: readable by uid 1000 even from a checkout made under umask 077.
RUN chmod -R a+rX /app

# A fixed non-root user; mounted directories the container writes to (runs/, data/) must be writable by it.
RUN useradd --uid 1000 --user-group --create-home --shell /usr/sbin/nologin nmt


# Training: `nmt prepare bible` reads the Reina-Valera 1909 and King James texts from Debian's SWORD packages.
FROM base AS train
RUN apt-get update \
    && apt-get install -y --no-install-recommends sword-text-sparv sword-text-kjv \
    && rm -rf /var/lib/apt/lists/*
USER 1000:1000
CMD ["nmt", "train", "configs/base.yaml"]


# The shipped model, made readable by uid 1000 here: a chmod in the serve stage would add a second copy of the
# model as a layer of its own; COPY --from keeps these modes and adds one.
FROM base AS model
COPY models/es-en-bible/ /models/es-en-bible/
RUN chmod -R a+rX /models


# The service (the last stage, so a plain `docker build .` builds it).
FROM base AS serve
# The shipped model as a default; docker-compose mounts ./models over /models.
COPY --from=model /models/ /models/
# NMT_THREADS: torch threads per worker process; keep workers x threads <= the CPUs the container gets.
ENV NMT_MODEL_DIR=/models/es-en-bible \
    NMT_THREADS=2
USER 1000:1000
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/v1/ready', timeout=4).status != 200)"]
# Exec form: tini passes SIGTERM to `nmt`; uvicorn then stops accepting connections and finishes the requests in
# flight. No model argument: `nmt serve` takes the model from NMT_MODEL_DIR.
CMD ["nmt", "serve", "--host", "0.0.0.0", "--port", "8000"]
