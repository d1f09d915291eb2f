# Hindsight: the two commands a user needs are `make demo` and `make test`.
CARGO ?= cargo
RUN_DIR ?= runs/demo
STEPS ?= 3
ACTORS ?= 2

.PHONY: demo test model build check fmt image cluster cluster-down

## Fetch SmolLM2-135M-Instruct, build, and train it with HiR on a local cluster.
demo: build model
	./target/release/hindsight up --model smollm2 --actors $(ACTORS) --steps $(STEPS) \
		--prompts-per-batch 2 --max-new-tokens 96 --run-dir $(RUN_DIR)
	@echo "run summary: $(RUN_DIR)/summary.json"

## Everything CI runs: unit, conformance and end-to-end tests (fetches the model once).
test:
	$(CARGO) test --workspace --all-targets

## Download the default model into the cache (~/.cache/hindsight or $$HINDSIGHT_CACHE).
model: build
	./target/release/hindsight fetch-model

build:
	$(CARGO) build --release --bin hindsight

check:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

## Container images (no registry needed): hindsight:<version>/:latest and hindsight-prometheus.
image: build
	deploy/docker/build-image.sh
	deploy/docker/build-prometheus-image.sh

## The docker-compose cluster (deploy/compose): `make cluster ACTORS=4 MODEL=tiny`.
cluster:
	MODEL=$(or $(MODEL),smollm2) deploy/compose/cluster.sh up $(ACTORS)

cluster-down:
	deploy/compose/cluster.sh down
