# The two commands: `make demo` (set up, then the main job) and `make test` (set up, then the tests).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

# Idempotent: reruns only when pyproject.toml changes. Torch goes first: without CUDA,
# torch==2.13.0 resolves to the CPU build; an unpinned torch would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e ".[test]"
	touch $@

demo: setup
	$(VENV)/bin/tweetlm demo

# The web chat test drives Debian's chromium through Playwright (no browser download at run time).
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium

# tests/test_slurm.py runs examples/train.sbatch under a one-node Slurm that scripts/slurm-local.sh starts from these.
SLURMD := /usr/sbin/slurmd

$(SLURMD):
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge

test: setup $(CHROMIUM) $(SLURMD)
	$(PY) -m pytest -q -x

clean:
	rm -rf $(VENV) work
