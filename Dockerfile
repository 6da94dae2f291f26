# syntax=docker/dockerfile:1
#
# The turnd container image: one static binary on `scratch`, run as a non-root numeric user.
#
# Stages:
#   builder           compiles a static (crt-static, glibc) turnd from this source tree.
#   runtime           (default) the image: scratch + /turnd from `builder`.
#   runtime-prebuilt  the same image from a static binary built on the host beforehand, for
#                     CI and machines without a registry (the `rust` image cannot be pulled):
#                       RUSTFLAGS='-C target-feature=+crt-static' \
#                         cargo build --release -p turnd --target x86_64-unknown-linux-gnu
#                       podman build --target runtime-prebuilt -t turnd .
#
# Privileged ports: turnd listens on 443/tcp (TURN over TLS through firewalls). The pod gets
# NET_BIND_SERVICE from its securityContext (capabilities: drop ALL, add NET_BIND_SERVICE;
# allowPrivilegeEscalation: false). containerd/CRI gives no ambient capabilities, so for a
# non-root process the added capability only becomes effective if the executable carries it
# as a file capability: the builder stage runs `setcap cap_net_bind_service=+ep /turnd`
# (`scratch` has no setcap, so it must happen there). Checked here with podman/buildah: COPY
# keeps the security.capability xattr (getcap on the mounted image shows it). For
# runtime-prebuilt, run the same setcap on the host binary before `podman build`. (podman
# itself puts --cap-add capabilities in the ambient set for non-root users, so under podman
# 443 binds with or without the file capability.) Without either, listen on ports >= 1024 or
# set the node sysctl net.ipv4.ip_unprivileged_port_start=443 (hostNetwork pods share the
# node's network namespace).
#
# No HEALTHCHECK on purpose: Kubernetes liveness/readiness probes watch the pod.

ARG RUST_VERSION=1.85

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src
COPY . .
RUN RUSTFLAGS='-C target-feature=+crt-static' \
      cargo build --release --locked -p turnd --target x86_64-unknown-linux-gnu \
 && install -m 0755 target/x86_64-unknown-linux-gnu/release/turnd /turnd \
 && apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends libcap2-bin \
 && setcap cap_net_bind_service=+ep /turnd \
 && /turnd --version

# Shared settings of both runtime stages live in this base.
FROM scratch AS runtime-base
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="turnd" \
      org.opencontainers.image.description="A TURN/STUN server (RFC 8656, RFC 8489) written in Rust" \
      org.opencontainers.image.source="https://github.com/turnd/turnd" \
      org.opencontainers.image.url="https://github.com/turnd/turnd" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.vendor="turnd"
# STUN/TURN over UDP and TCP, TURN over TLS on 5349 and on 443. The relay range
# (49152-50175/udp by default) is reached through host networking, not published ports.
EXPOSE 3478/udp 3478/tcp 5349/tcp 443/tcp
# 65532: the conventional "nonroot" uid/gid; numeric so Kubernetes runAsNonRoot can check it
# without an /etc/passwd (scratch has none).
USER 65532:65532
ENTRYPOINT ["/turnd"]
CMD ["--config", "/etc/turnd/turnd.toml"]

FROM runtime-base AS runtime-prebuilt
COPY --chmod=0755 target/x86_64-unknown-linux-gnu/release/turnd /turnd

FROM runtime-base AS runtime
COPY --from=builder /turnd /turnd
