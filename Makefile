# Two entry points (see README "Quick start"); each sets itself up on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
ART := artifacts/gemma3-270m-fp32

.PHONY: demo test test-fast lint clean

$(BIN)/gemma-export: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	touch $@

# Export the bundled real Gemma 3 270M, verify parity, generate a few words.
demo: $(BIN)/gemma-export
	$(BIN)/gemma-export export --out $(ART) --force
	$(BIN)/gemma-export generate $(ART) "The capital of France is" --max-new-tokens 24

# The whole test suite: tiny presets and the real Gemma 3 270M.
test: $(BIN)/gemma-export
	$(BIN)/python -m pytest -q -ra

# The tier to run while working: tiny presets only, no real model, no slow checks.
test-fast: $(BIN)/gemma-export
	$(BIN)/python -m pytest -q -ra -m "not real and not slow" -p no:cacheprovider

lint: $(BIN)/gemma-export
	$(BIN)/ruff check gemma_export tests benchmarks scripts

clean:
	rm -rf $(VENV) artifacts .pytest_cache
