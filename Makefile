# tcptrace-ebpf. Every target runs as root on Debian 12 and installs what it needs.
#   make serve   install, then run the Prometheus exporter on :10072 (the main job)
#   make test    install, then run the whole test suite
#   make lint    ruff and mypy
#   make interface   regenerate bpf/tcptrace_interface.h from tcptrace_ebpf/kernel/interface.py
#   make bench   install, then run the benchmark (several minutes)
#   make test-kernels   install, then run the tests that meet kernel differences
#                (KERNEL_TESTS) inside Debian's 6.1 and 6.12 kernels in qemu
#                (KERNELS=6.1 for one series, ARGS for other tests; tests/kernels/README.md)
#   make ci      what .ci/run does: make test, then make test-kernels

VENV := .venv
PY := $(VENV)/bin/python
ARGS ?=
KERNELS ?= 6.1 6.12
# The tests that meet what differs between kernels: every scenario, serve's
# metrics, sockets older than the tracer, degraded modes, closewait and
# timewait, the CLI, exactness and the cross-check with the kernel's counters.
KERNEL_TESTS := tests/test_scenarios.py tests/test_serve.py tests/test_preexisting.py \
	tests/test_probe.py tests/test_closewait.py tests/test_timewait.py tests/test_cli.py \
	tests/test_exact.py tests/test_crosscheck.py tests/test_doctor.py

.PHONY: setup setup-test serve test test-kernels ci lint interface bench clean

setup:
	sh scripts/setup.sh

setup-test:
	sh scripts/setup.sh --test

serve: setup
	exec $(VENV)/bin/tcptrace-ebpf serve $(ARGS)

test: setup-test
	$(PY) -m pytest -p no:cacheprovider $(ARGS)

# ARGS, when given, replaces the default selection (KERNEL_TESTS) in the guests.
test-kernels: setup-test
	$(PY) tests/kernels/matrix.py --kernels '$(KERNELS)' -- $(or $(ARGS),-v $(KERNEL_TESTS))

# Not `ci: test test-kernels`: ARGS would go to both.
ci: test
	$(MAKE) test-kernels ARGS=

interface: setup
	$(PY) -m tcptrace_ebpf.kernel.interface --write bpf

lint: setup-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: setup
	$(PY) bench/run $(ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
