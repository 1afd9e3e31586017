# RefLade: `make demo` runs the main job, `make test` the whole suite. Both create .venv when missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test bench lint format wheel clean-venv

# The venv is (re)built when pyproject.toml changes; its creation is timed apart from the demo.
$(STAMP): pyproject.toml
	@start=$$(date +%s); \
	if [ ! -x $(BIN)/python ]; then $(PYTHON) -m venv $(VENV) || exit 1; fi; \
	$(BIN)/python -m pip install -q --upgrade pip && \
	$(BIN)/python -m pip install -q -e '.[dev]' && \
	touch $(STAMP) && \
	echo "venv ready in $$(( $$(date +%s) - start )) s ($(VENV))"

demo: $(STAMP)
	$(BIN)/reflade demo $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

bench: $(STAMP)
	@for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

lint: $(STAMP)
	$(BIN)/ruff check platform engine train serve eval tests bench
	$(BIN)/ruff format --check platform engine train serve eval tests bench

format: $(STAMP)
	$(BIN)/ruff format platform engine train serve eval tests bench

wheel: $(STAMP)
	$(BIN)/python -m pip wheel --no-deps --no-build-isolation -w dist .

clean-venv:
	rm -rf $(VENV)
