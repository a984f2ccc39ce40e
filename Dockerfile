# syntax=docker/dockerfile:1
# The trialflow image: the one `trialflow` binary (every component is a subcommand) on
# distroless/cc: glibc, OpenSSL 3, CA certificates, no shell, no package manager, user 65532.
#
#   docker build -t trialflow .
#   docker run --rm trialflow services
#
# Checked with hadolint in `make helm-check` (no Docker engine on the project's machines).

ARG RUST_VERSION=1.95

# cargo-chef: the dependencies are built in their own layer, from a recipe of the manifests and
# Cargo.lock only, so editing the code rebuilds the workspace's crates and nothing else.
FROM rust:${RUST_VERSION}-bookworm AS chef
RUN cargo install cargo-chef --version 0.1.78 --locked
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
# rdkafka builds librdkafka from its bundled source (make and the C toolchain of this image) and
# links it statically; its `ssl` feature links the system OpenSSL (libssl3 in the runtime image,
# the same Debian 12 ABI). zlib is linked statically: distroless/cc has none. What remains dynamic
# (`ldd` of a build on Debian 12): libssl.so.3, libcrypto.so.3, libgcc_s.so.1, libm, libc.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libssl-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
ENV LIBZ_SYS_STATIC=1 \
    CARGO_INCREMENTAL=0
COPY --from=planner /src/recipe.json recipe.json
RUN cargo chef cook --release --locked -p trialflow --bin trialflow --recipe-path recipe.json
COPY . .
RUN cargo build --release --locked -p trialflow --bin trialflow \
    && install -D -m 0555 target/release/trialflow /out/trialflow

# The `nonroot` variant: user and group 65532. Nothing is written outside /tmp (a volume in the
# Helm chart), so the root filesystem can be read-only.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /out/trialflow /usr/local/bin/trialflow
USER 65532:65532
WORKDIR /tmp
# Metrics and probes reachable from outside the container (`/metrics`, `/healthz`, `/readyz`).
ENV METRICS_ADDR=0.0.0.0:9464 \
    LOG_FORMAT=json
EXPOSE 8081 8082 8083 9464
ENTRYPOINT ["/usr/local/bin/trialflow"]
CMD ["--help"]
