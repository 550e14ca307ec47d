# The Leash broker image.
#
# Not built on this project's CI machines: they run no Docker engine. It is
# kept plain on purpose: the build stage runs exactly the README's release
# build (`cargo build --release --locked -p leash-broker --bin leash`), and the
# runtime stage holds that one binary on distroless (glibc and CA
# certificates only: no shell, no package manager), as user 65532.
#
#   docker build -t leash:0.1.0 .
#   docker run --rm leash:0.1.0 --version
#
# charts/leash runs it with `serve --config /etc/leash/config/leash.toml`.

ARG RUST_VERSION=1.89

FROM docker.io/library/rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src
# Dependencies first, so that a source change reuses their layer.
COPY Cargo.toml Cargo.lock ./
COPY proto proto
COPY broker broker
COPY agent-sdk agent-sdk
COPY tests tests
COPY examples examples
RUN cargo build --release --locked -p leash-broker --bin leash \
 && install -D -m 0755 target/release/leash /out/leash

FROM gcr.io/distroless/cc-debian12:nonroot
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="leash" \
      org.opencontainers.image.description="Just-in-time, task-scoped credentials for AI agents" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/leash-dev/leash" \
      org.opencontainers.image.documentation="https://github.com/leash-dev/leash/blob/main/charts/leash/README.md"
COPY --from=build /out/leash /usr/local/bin/leash
USER 65532:65532
# 8443: mTLS for agents and resource servers; 8081: plaintext ops (probes, metrics).
EXPOSE 8443 8081
ENTRYPOINT ["/usr/local/bin/leash"]
CMD ["--help"]
