# The two commands of the README:  `make run`  and  `make test`.
VENV   ?= .venv
PYTHON ?= python3
PIP     = $(VENV)/bin/pip
APT_PACKAGES = dcmtk dicom3tools orthanc

.PHONY: run test install install-test system-deps bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

install: $(VENV)/bin/python
	$(PIP) install --quiet -e .

install-test: $(VENV)/bin/python
	$(PIP) install --quiet -e '.[test]'

# Real DICOM peers for the tests (DCMTK, dicom3tools, Orthanc) from Debian's packages.
system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

run: install
	$(VENV)/bin/pneumo serve

test: system-deps install-test
	$(VENV)/bin/pytest

bench: install-test
	$(VENV)/bin/python bench/ingest.py

clean:
	rm -rf $(VENV) var .pytest_cache
