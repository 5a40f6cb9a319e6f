# fastrelay: every target installs what it needs first (scripts/setup is idempotent).
PY := .venv/bin/python

.PHONY: setup demo test bench bpf lint clean

setup:
	@scripts/setup

demo: setup
	$(PY) -m fastrelay.demo

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m fastrelay bench udp-fanout --write BENCHMARKS.md --plots bench/results
	$(PY) -m fastrelay bench moq --write BENCHMARKS.md
	$(PY) -m fastrelay bench moq-datapath --datapaths kernel,userspace,kernel-aioquic-recovery,aiomoqt,moq-dev,kernel-pass-acks --write BENCHMARKS.md --plots bench/results

bpf: setup
	$(PY) -m fastrelay build

lint: setup
	.venv/bin/ruff check src tests

clean:
	rm -rf .venv demo-output .pytest_cache
	$(PY) -m fastrelay cleanup 2>/dev/null || true
