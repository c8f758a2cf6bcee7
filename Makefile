# Two commands for a fresh machine (see README):
#   make demo   creates .venv and runs the demo on the embedded default model
#   make test   creates .venv and runs the test suite
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test env clean

REQUIREMENTS := CLIPSeg/Resources/requirements.txt

$(STAMP): pyproject.toml $(REQUIREMENTS)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet $$(grep -E '^torch(vision)?[=<>~ ]' $(REQUIREMENTS))
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

env: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/clipseg demo --output-dir demo_output

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q Testing

clean:
	rm -rf $(VENV) demo_output build
