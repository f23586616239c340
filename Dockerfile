# Build: docker build -t twokey .
# Run:   docker run -p 8080:8080 -v twokey-data:/var/lib/twokey \
#          -v $PWD/twokey.toml:/etc/twokey/twokey.toml:ro twokey
FROM rust:1.95-bookworm AS build
# pg_query (PostgreSQL's parser) generates its bindings with bindgen, which needs libclang.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libclang-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock rust-toolchain.toml ./
COPY src ./src
COPY migrations ./migrations
COPY templates ./templates
COPY static ./static
COPY benches ./benches
COPY twokey.example.toml ./
RUN cargo build --release --locked --bin twokey

# The session replay player, from npm with the lockfile (never copied into the repo).
FROM node:20-bookworm-slim AS assets
WORKDIR /src
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --no-audit --no-fund

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/twokey --shell /usr/sbin/nologin twokey \
 && mkdir -p /var/lib/twokey /etc/twokey \
 && chown twokey:twokey /var/lib/twokey
COPY --from=build /src/target/release/twokey /usr/local/bin/twokey
COPY --from=assets /src/node_modules/asciinema-player/dist/bundle /usr/share/twokey/asciinema-player
USER twokey
VOLUME ["/var/lib/twokey"]
ENV TWOKEY_DATA_DIR=/var/lib/twokey \
    TWOKEY_LISTEN=0.0.0.0:8080
EXPOSE 8080 2222
ENTRYPOINT ["/usr/local/bin/twokey"]
CMD ["serve", "--config", "/etc/twokey/twokey.toml"]
