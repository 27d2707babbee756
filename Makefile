# Two commands do all set-up on a fresh machine:  make demo   and   make test
# Both create (once) and reuse a virtual environment in .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test install bench clean-venv browser-deps

# Dependencies first, each built in isolation as its authors intend, under constraints.txt; then our own
# package alone (--no-deps) against the installed torch (--no-build-isolation), for the C++ extension.
$(STAMP): pyproject.toml setup.py constraints.txt $(wildcard gridinr_nerfstudio/fields/hash_grid/csrc/*.cpp gridinr_nerfstudio/rendering/csrc/*.cpp gridinr_nerfstudio/csrc/*.h)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel ninja
	$(BIN)/pip install -q -c constraints.txt $(TORCH)
	$(BIN)/python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
	print('\n'.join(p['dependencies'] + p['optional-dependencies']['dev'] + p['optional-dependencies']['bench']))" > $(VENV)/requirements.txt
	$(BIN)/pip install -q -c constraints.txt -r $(VENV)/requirements.txt
	$(BIN)/pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m gridinr_nerfstudio.scripts.demo --output-dir demo_output

# Headless Chromium for tests/test_viewer.py (skipped without it): best effort, never fails.
browser-deps:
	command -v chromium >/dev/null || (DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium || true)

test: $(STAMP) browser-deps
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/gridinr-bench all

clean-venv:
	rm -rf $(VENV)
