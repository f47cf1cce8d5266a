# weft's image for conf-examples/kube-weft.yml: weftd in /usr/local/bin, the CNI
# plugins in /opt/weft/bin (the DaemonSet's init container copies them to the
# node's /opt/cni/bin).
#
#   docker build -t weft:latest .
#
# Only the sources are copied in (with BuildKit, target/ is never sent).

FROM rust:1.89-bookworm AS build
# protoc: etcd-client's build script.
RUN apt-get update \
    && apt-get install -y --no-install-recommends protobuf-compiler \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Every workspace member, so cargo can load the workspace.
COPY Cargo.toml Cargo.lock ./
COPY core core
COPY ipam ipam
COPY plugins plugins
COPY agent agent
COPY netns-tests netns-tests
COPY bench bench
RUN cargo build --release --locked --bins \
        -p weftd -p bridge -p host-local -p portmap -p flannel -p vxlan-overlay -p host-gw

FROM debian:bookworm-slim
# nftables: weftd and the plugins write their rules with nft;
# iproute2: `ip` for looking at the node from the container.
RUN apt-get update \
    && apt-get install -y --no-install-recommends nftables iproute2 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/weftd /usr/local/bin/weftd
COPY --from=build \
    /src/target/release/flannel \
    /src/target/release/bridge \
    /src/target/release/host-local \
    /src/target/release/portmap \
    /src/target/release/vxlan-overlay \
    /src/target/release/host-gw \
    /opt/weft/bin/
ENTRYPOINT ["/usr/local/bin/weftd"]
