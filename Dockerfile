# Multi-stage build: compile in the Rust image, run from a slim Debian.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY config ./config
COPY benches ./benches
RUN cargo build --release --locked --bin lifelora

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home /var/lib/lifelora lifelora \
    && mkdir -p /var/lib/lifelora/adapters /var/lib/lifelora/data \
    && chown -R lifelora /var/lib/lifelora
COPY --from=build /src/target/release/lifelora /usr/local/bin/lifelora
COPY config/default.toml /etc/lifelora/default.toml
USER lifelora
WORKDIR /var/lib/lifelora
ENV LIFELORA_SERVER__HOST=0.0.0.0
EXPOSE 8080
# Mount a model directory and pass --model /models/NAME, or run the built-in demo.
ENTRYPOINT ["lifelora", "serve"]
