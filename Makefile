# RefLade: `make demo` runs the main job, `make test` the whole suite. Both create .venv when missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test bench lint format wheel chromium clean-venv

# Headless Chromium renders report.html in tests/eval/test_report_html.py and drives the service's pages in
# tests/serve/test_pages.py (through Playwright's executable_path; those tests are skipped without it): Debian's package,
# through apt-get as root or with passwordless sudo; `apt-get update` only when the first install fails.
CHROMIUM_INSTALL = \
    if command -v chromium >/dev/null 2>&1; then echo "chromium: $$(command -v chromium)"; exit 0; fi; \
    if ! command -v apt-get >/dev/null 2>&1; then \
        echo "chromium is not installed and there is no apt-get: install Chromium with this system's package manager"; \
        exit 1; \
    fi; \
    if [ "$$(id -u)" = 0 ]; then as=""; \
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then as="sudo -n"; \
    else \
        echo "chromium is not installed and apt-get needs root:" \
            "run 'sudo apt-get install -y --no-install-recommends chromium'"; \
        exit 1; \
    fi; \
    apt="$$as env DEBIAN_FRONTEND=noninteractive apt-get"; \
    $$apt install -y -q --no-install-recommends chromium \
        || { $$apt update -q && $$apt install -y -q --no-install-recommends chromium; }

# The venv is (re)built when pyproject.toml changes; its creation is timed apart from the demo.
$(STAMP): pyproject.toml
	@start=$$(date +%s); \
	if [ ! -x $(BIN)/python ]; then $(PYTHON) -m venv $(VENV) || exit 1; fi; \
	$(BIN)/python -m pip install -q --upgrade pip && \
	$(BIN)/python -m pip install -q -e '.[dev]' && \
	touch $(STAMP) && \
	echo "venv ready in $$(( $$(date +%s) - start )) s ($(VENV))" && \
	{ ( $(CHROMIUM_INSTALL) ) || echo "note: no chromium, so the browser tests (report, pages) are skipped (make chromium)"; }

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

chromium:
	@( $(CHROMIUM_INSTALL) )

wheel: $(STAMP)
	$(BIN)/python -m pip wheel --no-deps --no-build-isolation -w dist .

clean-venv:
	rm -rf $(VENV)
