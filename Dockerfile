# syntax=docker/dockerfile:1
# The relayrate image: relayrate and relayratectl on Debian slim, run as
# user 10001, started by the StatefulSet's entrypoint script.
#   docker build -t relayrate:0.1.0 .
# The Postfix sidecar's image is deploy/postfix/Dockerfile.

FROM rust:1.88-slim-bookworm AS build
WORKDIR /src
# What `cargo build` reads; benches/ because Cargo.toml declares a bench.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY src src
COPY examples examples
COPY benches benches
# The caches keep the registry and compiled dependencies between builds;
# the binaries are copied out of the cached target dir in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin relayrate --bin relayratectl \
    && mkdir /out \
    && cp target/release/relayrate target/release/relayratectl /out/

FROM debian:bookworm-slim
# curl: the preStop hook asks the Kubernetes API for the StatefulSet's
# replicas (deploy/kubernetes/prestop.sh).
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 relayrate \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /var/lib/relayrate --shell /usr/sbin/nologin relayrate \
    && install -d -o 10001 -g 10001 /var/lib/relayrate
COPY --from=build /out/relayrate /out/relayratectl /usr/local/bin/
COPY --chmod=755 deploy/kubernetes/entrypoint.sh /usr/local/bin/relayrate-entrypoint
COPY --chmod=755 deploy/kubernetes/prestop.sh /usr/local/bin/relayrate-prestop
# The seed's policy; Kubernetes mounts the relayrate-policy ConfigMap here.
COPY examples/ze-policy.txt /etc/relayrate/ze-policy.txt
LABEL org.opencontainers.image.title="relayrate" \
      org.opencontainers.image.licenses="GPL-3.0-or-later"
USER 10001:10001
# 7450 gRPC for clients (Limiter, Admin, health), 7460 gRPC for the other
# nodes (Raft), 9450 metrics; the milter listens on 127.0.0.1:8894 for the
# Postfix of the same pod.
EXPOSE 7450 7460 9450
ENTRYPOINT ["/usr/local/bin/relayrate-entrypoint"]
