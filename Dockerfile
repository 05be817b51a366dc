# syntax=docker/dockerfile:1
#
# nearcache image: a static-ish release binary on debian:bookworm-slim, running as uid 10001.
#
#   docker build -t nearcache .
#   docker run --rm -p 6380:6380 -p 9121:9121 nearcache --upstream redis://host.docker.internal:6379
#
# The cache mounts keep the crates.io registry and the target directory between builds
# (BuildKit, the default builder since Docker 23).

ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS builder
WORKDIR /src
COPY . .
# debug = 1 in the release profile is for local profiling; the image keeps symbols
# (readable panic backtraces) but drops the DWARF line tables.
ENV CARGO_PROFILE_RELEASE_STRIP=debuginfo
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin nearcache \
 && install -D -m 0755 target/release/nearcache /out/nearcache

FROM ${RUNTIME_IMAGE}
# ca-certificates: root store for rediss:// upstreams (rustls-native-certs reads it).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 nearcache \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin nearcache \
 && mkdir -p /etc/nearcache
COPY --from=builder /out/nearcache /usr/local/bin/nearcache
COPY conf/nearcache.toml /etc/nearcache/nearcache.example.toml
USER 10001:10001
# 6380: Redis protocol (clients). 9121: admin HTTP (/metrics, /healthz, /readyz).
EXPOSE 6380 9121
# SIGTERM triggers the graceful shutdown (shutdown_grace, default 10s); keep the
# orchestrator's stop timeout above it.
STOPSIGNAL SIGTERM
ENV RUST_LOG=info
ENTRYPOINT ["nearcache"]
CMD ["--listen", "0.0.0.0:6380", "--admin", "0.0.0.0:9121"]
