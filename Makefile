# Blockspace: `make demo` and `make test` are all a fresh Debian 12 machine (as root) needs;
# both run `make setup` first, which installs what is missing and is quick once done.

REPO := $(patsubst %/,%,$(dir $(abspath $(lastword $(MAKEFILE_LIST)))))
VENV := $(REPO)/.venv
PY   := $(VENV)/bin/python

# Extra arguments for pytest, e.g. `make test PYTEST_ARGS="-k layouts -x"`.
PYTEST_ARGS ?=
# `make test` spreads the test files over this many pytest-xdist workers (a file stays on one
# worker, so its module fixtures, the crash campaigns, are built once); 0 runs in-process.
# Two: on a 2-core machine the serial run left a core idle while a test waited on its daemon.
TEST_WORKERS ?= 2

# pytest exit codes are propagated; 5 ("no tests collected") is a failure too, with a word why.
define run_pytest
	@cd "$(REPO)" && "$(PY)" -m pytest $(1) $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make: pytest collected no tests: failing" >&2; fi; \
	exit $$rc
endef

.PHONY: help setup test test-unit test-slow lint demo demo-clean

help:
	@echo "make setup       install system packages, .venv and the package (idempotent)"
	@echo "make test        setup, lint, then the default test suite (not slow): what CI runs"
	@echo "make test-unit   the pure in-process tests only (tests/unit, under 30 s): the everyday loop"
	@echo "make test-slow   setup, then the slow tests only"
	@echo "make lint        setup, then ruff check and mypy"
	@echo "make demo        setup, then build and mount a demo pool under ./demo"
	@echo "make demo-clean  unmount and remove ./demo"
	@echo "make vmlab       setup, then the kernel-fault scenario table in a qemu VM (docs/vmlab.md)"
	@echo "make mutants     setup, then break each guarantee on purpose and check the tests catch it"

setup:
	@bash "$(REPO)/tools/setup-env.sh"

test: setup lint
	$(call run_pytest,-q -m "not slow" -n $(TEST_WORKERS) --dist loadfile)

test-unit: setup
	$(call run_pytest,-q tests/unit)

test-slow: setup
	$(call run_pytest,-q -m slow)

lint: setup
	cd "$(REPO)" && "$(VENV)/bin/ruff" check . && "$(VENV)/bin/mypy" blockspace

demo: setup
	@bash "$(REPO)/tools/demo.sh"

demo-clean:
	@bash "$(REPO)/tools/demo-clean.sh"

# Side-by-side benchmark (issue 7; docs/benchmarks.md). Full mode by default; for a check:
# `make bench BENCH_ARGS="--quick"`, or pick setups: BENCH_ARGS="--quick --setups raw,mirror-2".
# tools/bench installs what it needs (fio, btrfs-progs, qemu-system-common, matplotlib).
BENCH_ARGS ?=

.PHONY: bench
bench: setup
	"$(REPO)/tools/bench" $(BENCH_ARGS)

# The VM fault lab (docs/vmlab.md): dm-flakey, dm-delay, linear+error and dm-log-writes under
# the pool's disks, inside a throw-away qemu VM. Extra runner options: VMLAB_ARGS="--all".
VMLAB_ARGS ?=

.PHONY: vmlab

vmlab: setup
	@"$(REPO)/tools/vmlab" setup
	@"$(REPO)/tools/vmlab" scenarios $(VMLAB_ARGS)

# The mutation check (README "Mutation check"): each guarantee in tools/mutants.toml broken on
# purpose in a scratch copy, one at a time, against the tests that must catch it. Before a
# release, outside `make test`. Options: MUTANTS_ARGS="--only NAME,NAME", "--list", "--json".
MUTANTS_ARGS ?=

.PHONY: mutants
mutants: setup
	"$(REPO)/tools/mutants" $(MUTANTS_ARGS)
