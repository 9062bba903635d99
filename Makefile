# Two entry points, both from a fresh clone (each creates ./.venv on first use):
#   make test   - lint + the whole test suite on CPU (what CI runs)
#   make demo   - the main job: `nemo run recipes/onpolicy_qat.py` on its built-in tiny default
VENV ?= .venv
export OMP_NUM_THREADS ?= 1

.PHONY: setup test demo lint

setup:
	@scripts/bootstrap.sh

lint: setup
	$(VENV)/bin/ruff check .

test: lint
	$(VENV)/bin/python -m pytest -q --durations=15

demo: setup
	$(VENV)/bin/nemo run recipes/onpolicy_qat.py
