# Two entry points, both from a fresh clone (each creates ./.venv on first use):
#   make test   - lint + the whole test suite on CPU (what CI runs)
#   make demo   - the main job: `nemo run recipes/onpolicy_qat.py` on its built-in tiny default
# And one for current megatron-core (not run by CI; docs/compatibility.md):
#   make test-compat [PYTEST_ARGS="tests/test_models.py"] - the suite on Python 3.12 with the newest
#                 megatron-core pyproject.toml allows, in ./.venv-compat (scripts/test_compat.sh)
VENV ?= .venv
export OMP_NUM_THREADS ?= 1

.PHONY: setup test demo lint test-compat

setup:
	@scripts/bootstrap.sh

lint: setup
	$(VENV)/bin/ruff check .

test: lint
	$(VENV)/bin/python -m pytest -q --durations=15

demo: setup
	$(VENV)/bin/nemo run recipes/onpolicy_qat.py

test-compat:
	@scripts/test_compat.sh $(PYTEST_ARGS)
