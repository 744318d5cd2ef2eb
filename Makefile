# Two entry points a newcomer needs: `make demo` and `make test`. Both install into ./.venv.
# torch is pinned by constraints.txt to the CPU wheel so pip never pulls the CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
PIN := -c constraints.txt

.PHONY: demo test install install-test bench clean

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install $(PIN) torch==2.13.0

install: $(PY)
	$(PIP) install $(PIN) -e ".[all]"

install-test: $(PY)
	$(PIP) install $(PIN) -e ".[all,test]"

demo: install
	$(VENV)/bin/sparsetorch demo

test: install-test
	$(PY) -m pytest -p no:cacheprovider

clean:
	rm -rf $(VENV) build src/*.egg-info
