# The two commands of the README: `make demo` and `make test`. Both set up what they need.
.PHONY: setup demo test lint typecheck unit bench clean

setup:
	@scripts/setup.sh

demo: setup
	.venv/bin/netpass demo --out out

lint: setup
	.venv/bin/ruff check src tests
	.venv/bin/ruff format --check src tests

typecheck: setup
	.venv/bin/mypy

test: lint typecheck
	.venv/bin/pytest -q -ra

bench: setup
	.venv/bin/netpass bench --out docs/BENCHMARKS.md

clean:
	-.venv/bin/netpass lab down --name nplab
	rm -rf out .pytest_cache .mypy_cache .ruff_cache
