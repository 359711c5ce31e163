# Set-up and everyday commands. `make serve` and `make test` work on a fresh Debian machine.
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?= models/es-en-bible
HOST ?= 127.0.0.1
PORT ?= 8000
TORCH_VERSION := 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Debian packages: the Bible corpus (SWORD modules), Chromium for the web-page test, docker-compose to validate
# the compose file.
APT_PACKAGES := sword-text-sparv sword-text-kjv chromium chromium-driver docker-compose

.PHONY: setup system-deps serve test lint bible clean

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then $(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends $$missing; fi

$(VENV)/.installed: pyproject.toml constraints.txt
	# Debian's python3 leaves out venv's ensurepip (package python3-venv).
	python3 -c 'import ensurepip' 2>/dev/null || { $(SUDO) apt-get update && $(SUDO) apt-get install -y python3-venv; }
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# The CPU build of torch first: a bare `torch` requirement would pull several GB of CUDA libraries. A wheel
	# among pip's find-links (a machine's local wheels) if there is one, else PyTorch's CPU index; then its
	# dependencies from PyPI.
	$(PY) -m pip install --no-index --no-deps torch==$(TORCH_VERSION) || { \
		echo "no usable torch $(TORCH_VERSION) wheel among pip's find-links (above): trying $(TORCH_CPU_INDEX)"; \
		$(PY) -m pip install --no-deps torch==$(TORCH_VERSION) --index-url $(TORCH_CPU_INDEX); }
	$(PY) -m pip install torch==$(TORCH_VERSION)
	# The runtime dependencies at the versions the Docker image installs (constraints.txt), so that the tests
	# check what it ships; the test tools themselves as PyPI has them.
	$(PY) -m pip install -c constraints.txt -e '.[test]'
	touch $@

setup: system-deps $(VENV)/.installed

serve: $(VENV)/.installed  # the service needs no Debian packages
	$(VENV)/bin/nmt serve $(MODEL) --host $(HOST) --port $(PORT)

lint: setup
	$(VENV)/bin/ruff check .

test: setup lint
	$(VENV)/bin/python -m pytest -q

bible: setup
	$(VENV)/bin/nmt prepare bible data/bible

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
