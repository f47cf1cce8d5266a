#!/usr/bin/env bash
# weft installer: system packages, release build, plugins into CNI_BIN_DIR.
#
#   ./install.sh                 install (refuses to replace plugins it did not install)
#   ./install.sh --force         replace them, keeping the originals as <name>.pre-weft
#   ./install.sh --uninstall     remove exactly what was installed, restore originals
#   ./install.sh --no-deps       skip apt-get
#   CNI_BIN_DIR=/opt/weft/bin ./install.sh    install somewhere else
set -euo pipefail
cd "$(dirname "$0")"

CNI_BIN_DIR=${CNI_BIN_DIR:-/opt/cni/bin}
STATE_DIR=${WEFT_STATE_DIR:-/var/lib/weft}
MANIFEST=$STATE_DIR/install-manifest
PLUGINS=(bridge host-local portmap flannel vxlan-overlay host-gw)
FORCE=0 DEPS=1 ACTION=install

die() { echo "install.sh: $*" >&2; exit 1; }
say() { echo "==> $*"; }

for arg in "$@"; do
    case $arg in
        --force) FORCE=1 ;;
        --no-deps) DEPS=0 ;;
        --uninstall) ACTION=uninstall ;;
        -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $arg (see --help)" ;;
    esac
done
[ "$(id -u)" = 0 ] || die "run as root (it installs packages and writes $CNI_BIN_DIR)"

install_deps() {
    say "installing system packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends \
        build-essential protobuf-compiler nftables iproute2 util-linux >/dev/null
    command -v cargo >/dev/null || die "no Rust toolchain: install one with rustup (https://rustup.rs), then re-run"
}

# A file we may replace: ours from an earlier install, or absent.
owned_or_absent() {
    [ ! -e "$1" ] || { [ -f "$MANIFEST" ] && cut -f1 "$MANIFEST" | grep -qxF "$1"; }
}

do_install() {
    [ $DEPS = 1 ] && install_deps
    say "building release binaries"
    cargo build --release --bins --quiet
    local conflicts=()
    for p in "${PLUGINS[@]}"; do
        owned_or_absent "$CNI_BIN_DIR/$p" || conflicts+=("$CNI_BIN_DIR/$p")
    done
    if [ ${#conflicts[@]} -gt 0 ] && [ $FORCE = 0 ]; then
        die "would replace plugins weft did not install: ${conflicts[*]}
  re-run with --force (originals are kept as <name>.pre-weft and restored by --uninstall),
  or install elsewhere: CNI_BIN_DIR=/opt/weft/bin ./install.sh"
    fi
    mkdir -p "$CNI_BIN_DIR" "$STATE_DIR"
    touch "$MANIFEST"
    for p in "${PLUGINS[@]}"; do
        local dest=$CNI_BIN_DIR/$p backup=""
        if ! owned_or_absent "$dest"; then
            backup=$dest.pre-weft
            mv "$dest" "$backup"
        fi
        install -m 0755 "target/release/$p" "$dest.weft-new"
        mv "$dest.weft-new" "$dest"   # atomic: a runtime never execs a half-written file
        if ! cut -f1 "$MANIFEST" | grep -qxF "$dest"; then
            printf '%s\t%s\n' "$dest" "$backup" >>"$MANIFEST"
        fi
        say "installed $dest"
    done
    say "done: ${#PLUGINS[@]} plugin(s) in $CNI_BIN_DIR (manifest: $MANIFEST)"
}

do_uninstall() {
    [ -f "$MANIFEST" ] || die "nothing to uninstall ($MANIFEST not found)"
    while IFS=$'\t' read -r file backup; do
        rm -f "$file"
        if [ -n "$backup" ] && [ -e "$backup" ]; then mv "$backup" "$file"; fi
        say "removed $file${backup:+ (restored the original)}"
    done <"$MANIFEST"
    rm -f "$MANIFEST"
    rmdir "$STATE_DIR" 2>/dev/null || true
}

case $ACTION in
    install) do_install ;;
    uninstall) do_uninstall ;;
esac
