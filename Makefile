# The README's two commands: `make demo` and `make test`. Both create .venv when missing,
# install torch first (a bare `torch` requirement would pull a multi-GB CUDA build), then the
# project with the extras they need, every version pinned by constraints.txt.
#
# Each step leaves a stamp only when it finished, so an interrupted install (Ctrl-C during the
# torch download, say) is simply redone by the next `make`, never trusted half-done.

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test lint tools

$(VENV)/.torch-$(TORCH_VERSION):
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==$(TORCH_VERSION)
	touch $@

$(VENV)/.installed-base: pyproject.toml constraints.txt $(VENV)/.torch-$(TORCH_VERSION)
	$(PIP) install -q -c constraints.txt -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml constraints.txt $(VENV)/.torch-$(TORCH_VERSION)
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	touch $@ $(VENV)/.installed-base

# promtool runs the alert-rule unit tests, headless Chromium renders the rollout report in its test,
# PostgreSQL runs the state-database tests on their second backend (Debian's prometheus, chromium
# and postgresql packages; the tests start their own throw-away server, tests/pg.py); the
# multi-host tests build their hosts with iproute2 and util-linux (unshare, nsenter).
tools:
	@missing=""; \
	command -v promtool >/dev/null 2>&1 || missing="$$missing prometheus"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v ip >/dev/null 2>&1 || missing="$$missing iproute2"; \
	command -v nsenter >/dev/null 2>&1 || missing="$$missing util-linux"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian's$$missing"; \
	  $(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

demo: $(VENV)/.installed-base
	$(VENV)/bin/flowops demo

test: $(VENV)/.installed-dev tools
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check . || true
