# trialflow — the one entry point. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

CARGO ?= cargo
export DATABASE_URL ?= postgres://postgres@127.0.0.1:55432/trialflow
export KAFKA_BOOTSTRAP_SERVERS ?= 127.0.0.1:19092
ONLY ?=

.PHONY: help up down status build-deps build release migrate demo run relay test browser lint fmt bench interop interop-setup openapi-validator odm-validator helm-check clean

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

up: ## Start the local stack (PostgreSQL, Apache Kafka under .data/); idempotent
	@scripts/stack.sh up

down: ## Stop the local stack
	@scripts/stack.sh down

status: ## Show whether the local stack runs
	@scripts/stack.sh status

build-deps: ## Install what building needs besides Rust (pkg-config, OpenSSL's development files; Debian packages) where missing
	@scripts/build-deps.sh

build: build-deps ## Build everything (debug)
	$(CARGO) build --workspace --all-targets

migrate: up build-deps ## Create or upgrade every service schema
	$(CARGO) run -q -p trialflow -- migrate

release: build-deps ## Build the release binary (several minutes the first time; cargo shows its progress)
	@echo "[release] building target/release/trialflow (several minutes on a first build)"
	$(CARGO) build --release -p trialflow

demo: up release ## Replay the CDISC pilot study through every component, print the summary, keep serving
	$(CARGO) run -q --release -p trialflow -- demo

run: up release ## Run every component (site API, ePRO gateway, alert API, relay, consumers) in the foreground
	$(CARGO) run -q --release -p trialflow -- run

relay: up release ## Run one relay instance in the foreground
	$(CARGO) run -q --release -p trialflow -- relay

test: lint up browser interop-setup openapi-validator odm-validator helm-check ## fmt-check, clippy -D warnings, then every test against the local stack
	$(CARGO) test --workspace --all-targets

browser: ## Install headless Chromium and chromedriver (Debian packages) for the inbox page test
	@scripts/chromium.sh >/dev/null

lint: build-deps ## cargo fmt --check and clippy with warnings as errors
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt: ## Format the code
	$(CARGO) fmt --all

bench: up build-deps ## Benchmarks with their raw baselines (`make bench ONLY=relay|debezium|consumer|epro|monitoring|alerts|risk|load|scaling|soak` for one group)
	$(CARGO) build -q --release -p trialflow -p trialflow-bench
	$${CARGO_TARGET_DIR:-target}/release/trialflow-bench $(if $(ONLY),--only $(ONLY),)

openapi-validator: ## Install openapi-spec-validator (pinned, PyPI) into .tools/ for the OpenAPI test
	@scripts/openapi-validator.sh >/dev/null

odm-validator: ## Install the CDISC ODM 1.3.2 XSD (odmlib) and xmlschema (pinned, PyPI) into .tools/ for the audit export test
	@scripts/odm-validator.sh >/dev/null

helm-check: ## Lint the Dockerfile, lint and render the Helm chart (every helm/trialflow/ci/ file), validate it offline
	@scripts/helm-check.sh >/dev/null

interop-setup: ## Install the foreign clients' libraries (fastavro, confluent-kafka, Apache Avro and Kafka for Java) into .tools/interop/
	@interop/setup.sh

interop: up build-deps interop-setup ## The foreign-client tests alone: reference fingerprints (Java, fastavro) and Python/Java producers and consumers
	$(CARGO) test -p trialflow-schemas --test reference_fingerprints
	$(CARGO) test -p trialflow --test interop

clean: down ## Stop the stack and remove .data/ (keeps .tools/)
	rm -rf .data
