#!/usr/bin/env bash
# weft installer: system packages, release build, then the CNI plugins, weftd and
# its systemd unit (installed, not enabled), and optionally a conflist.
#
#   ./install.sh                   install (refuses to replace files it did not install)
#   ./install.sh --force           replace them, keeping the originals as <name>.pre-weft
#   ./install.sh --conflist NAME   also install conf-examples/NAME (e.g. 10-flannel.conflist)
#   ./install.sh --demo            install (with etcd-server for it), then run target/release/weft-demo
#   ./install.sh --uninstall       remove exactly what was installed, restore originals
#   ./install.sh --no-deps         skip apt-get
#
# Where things go (environment; defaults shown):
#   CNI_BIN_DIR=/opt/cni/bin           bridge host-local portmap flannel vxlan-overlay host-gw
#   WEFT_SBIN_DIR=/usr/local/bin       weftd
#   SYSTEMD_DIR=/etc/systemd/system    weftd.service
#   CNI_CONF_DIR=/etc/cni/net.d        the --conflist file
#   WEFT_STATE_DIR=/var/lib/weft       install-manifest: every file and directory installed
set -euo pipefail

# Directories given relative to where the installer was started from.
absolute() { case $1 in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$PWD/$1" ;; esac; }
CNI_BIN_DIR=$(absolute "${CNI_BIN_DIR:-/opt/cni/bin}")
SBIN_DIR=$(absolute "${WEFT_SBIN_DIR:-/usr/local/bin}")
SYSTEMD_DIR=$(absolute "${SYSTEMD_DIR:-/etc/systemd/system}")
CNI_CONF_DIR=$(absolute "${CNI_CONF_DIR:-/etc/cni/net.d}")
STATE_DIR=$(absolute "${WEFT_STATE_DIR:-/var/lib/weft}")
if [ -n "${CARGO_TARGET_DIR:-}" ]; then export CARGO_TARGET_DIR; CARGO_TARGET_DIR=$(absolute "$CARGO_TARGET_DIR"); fi
cd "$(dirname "$0")"
TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}

MANIFEST=$STATE_DIR/install-manifest
PLUGINS=(bridge host-local portmap flannel vxlan-overlay host-gw)
UNIT=$SYSTEMD_DIR/weftd.service
FORCE=0 DEPS=1 DEMO=0 ACTION=install CONFLIST=""

die() { echo "install.sh: $*" >&2; exit 1; }
say() { echo "==> $*"; }
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$(basename "$0")"; }

while [ $# -gt 0 ]; do
    case $1 in
        --force) FORCE=1 ;;
        --no-deps) DEPS=0 ;;
        --uninstall) ACTION=uninstall ;;
        --demo) DEMO=1 ;;
        --conflist) [ $# -ge 2 ] || die "--conflist needs a file name from conf-examples/"
                    CONFLIST=$2; shift ;;
        --conflist=*) CONFLIST=${1#--conflist=} ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
    shift
done
if [ $ACTION = uninstall ] && { [ $DEMO = 1 ] || [ -n "$CONFLIST" ]; }; then
    die "--demo and --conflist do not go with --uninstall (it removes everything in the manifest)"
fi
if [ -n "$CONFLIST" ]; then
    case $CONFLIST in
        */*|.*) die "--conflist takes a file name from conf-examples/, not a path: $CONFLIST" ;;
    esac
    if [ ! -f "conf-examples/$CONFLIST" ] || [[ $CONFLIST != *.conflist ]]; then
        die "no conf-examples/$CONFLIST; choose one of: $(cd conf-examples && echo ./*.conflist | sed 's#\./##g')"
    fi
fi
[ "$(id -u)" = 0 ] || die "run as root (it installs packages and writes $CNI_BIN_DIR)"

# The manifest: one line per thing installed, tab-separated.
#   file <path> <backup or empty>    a file we wrote; backup is the original we moved away
#   dir  <path>                      a directory we created (removed on uninstall if empty)
# An older installer wrote "<path> <backup>" lines: read as "file" lines, and its
# uninstall removed STATE_DIR when empty, so that becomes a "dir" line.
in_manifest() { # KIND PATH
    [ -f "$MANIFEST" ] && awk -F'\t' -v k="$1" -v p="$2" \
        '$1 == k && $2 == p { found = 1 } END { exit !found }' "$MANIFEST"
}
record() { # KIND PATH [BACKUP]
    in_manifest "$1" "$2" || printf '%s\t%s\t%s\n' "$1" "$2" "${3:-}" >>"$MANIFEST"
}
upgrade_manifest() {
    [ -f "$MANIFEST" ] || return 0
    awk -F'\t' '$1 != "file" && $1 != "dir" { found = 1 } END { exit !found }' "$MANIFEST" || return 0
    awk -F'\t' -v OFS='\t' -v state="$STATE_DIR" '
        $1 == "file" || $1 == "dir" { print; next }
        NF > 0 { print "file", $1, $2 }
        END { print "dir", state, "" }' "$MANIFEST" >"$MANIFEST.new"
    mv "$MANIFEST.new" "$MANIFEST"
}

# A path we may write: ours from an earlier install, or absent.
owned_or_absent() { { [ ! -e "$1" ] && [ ! -L "$1" ]; } || in_manifest file "$1"; }

# mkdir -p that records each directory it creates (STATE_DIR first: it holds the manifest).
make_dir() {
    local d=$1 created=()
    while [ ! -d "$d" ]; do created=("$d" "${created[@]}"); d=$(dirname "$d"); done
    mkdir -p "$1"
    for d in "${created[@]}"; do record dir "$d"; done
}

# Write stdin to DEST (mode MODE), moving a foreign DEST to DEST.pre-weft first. The
# manifest line goes in before anything moves, so an interrupted install can be undone.
put() { # DEST MODE < content
    local dest=$1 backup=""
    if ! owned_or_absent "$dest"; then
        backup=$dest.pre-weft
        record file "$dest" "$backup"
        mv "$dest" "$backup"
    else
        record file "$dest"
    fi
    cat >"$dest.weft-new"
    chmod "$2" "$dest.weft-new"
    mv -f "$dest.weft-new" "$dest"   # atomic: a runtime never execs or reads a half-written file
    say "installed $dest${backup:+ (the original is $backup)}"
}

systemd_running() { [ -d /run/systemd/system ]; }

install_deps() {
    say "installing system packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends \
        build-essential protobuf-compiler libprotobuf-dev nftables iproute2 util-linux >/dev/null
    if [ $DEMO = 1 ]; then   # the demo's etcd, and its traffic checks
        apt-get install -y -qq --no-install-recommends etcd-server iputils-ping curl >/dev/null
    fi
    command -v cargo >/dev/null || die "no Rust toolchain: install one with rustup (https://rustup.rs), then re-run"
}

do_install() {
    local dests=() conflicts=() p
    upgrade_manifest
    for p in "${PLUGINS[@]}"; do dests+=("$CNI_BIN_DIR/$p"); done
    dests+=("$SBIN_DIR/weftd" "$UNIT")
    [ -z "$CONFLIST" ] || dests+=("$CNI_CONF_DIR/$CONFLIST")
    for p in "${dests[@]}"; do owned_or_absent "$p" || conflicts+=("$p"); done
    if [ ${#conflicts[@]} -gt 0 ]; then
        [ $FORCE = 1 ] || die "would replace files weft did not install: ${conflicts[*]}
  re-run with --force (originals are kept as <name>.pre-weft and restored by --uninstall),
  or install elsewhere: CNI_BIN_DIR=/opt/weft/bin ./install.sh"
        for p in "${conflicts[@]}"; do
            if [ -e "$p.pre-weft" ] || [ -L "$p.pre-weft" ]; then
                die "$p.pre-weft already exists (from an earlier --force?): move it away first"
            fi
        done
    fi

    [ $DEPS = 0 ] || install_deps
    say "building release binaries"
    cargo build --release --bins --quiet
    for p in "${PLUGINS[@]}" weftd; do
        [ -x "$TARGET_DIR/release/$p" ] || die "the build did not produce $TARGET_DIR/release/$p"
    done

    make_dir "$STATE_DIR"
    make_dir "$CNI_BIN_DIR"
    for p in "${PLUGINS[@]}"; do put "$CNI_BIN_DIR/$p" 0755 <"$TARGET_DIR/release/$p"; done
    make_dir "$SBIN_DIR"
    put "$SBIN_DIR/weftd" 0755 <"$TARGET_DIR/release/weftd"
    make_dir "$SYSTEMD_DIR"
    sed "s|^ExecStart=/usr/local/bin/weftd |ExecStart=$SBIN_DIR/weftd |" agent/weftd.service |
        put "$UNIT" 0644
    if [ -n "$CONFLIST" ]; then
        make_dir "$CNI_CONF_DIR"
        put "$CNI_CONF_DIR/$CONFLIST" 0644 <"conf-examples/$CONFLIST"
    fi
    if systemd_running; then systemctl daemon-reload; fi

    say "done: ${#PLUGINS[@]} plugins in $CNI_BIN_DIR, $SBIN_DIR/weftd, $UNIT (manifest: $MANIFEST)"
    cat <<EOF
    weftd.service is installed but not enabled. To run weftd, give it its flags, e.g.
      echo 'WEFTD_ARGS="--etcd-endpoints=https://10.0.0.5:2379 --iface=eth0 --ip-masq"' >/etc/default/weftd
      systemctl daemon-reload && systemctl enable --now weftd
EOF
    [ -n "$CONFLIST" ] || echo "    No conflist installed: --conflist 10-flannel.conflist installs one into $CNI_CONF_DIR"
}

run_demo() {
    local demo=$TARGET_DIR/release/weft-demo
    [ -x "$demo" ] || die "no $demo: the demo binary (bench/src/bin/weft-demo.rs) was not built; the install itself is done"
    say "running $demo"
    exec "$demo"
}

# Stop and disable weftd.service if systemd runs it from the unit file being removed
# (and only then: a temporary SYSTEMD_DIR must not touch the host's weftd).
stop_unit() {
    systemd_running && in_manifest file "$UNIT" || return 0
    [ "$(systemctl show -p FragmentPath --value weftd.service 2>/dev/null)" = "$UNIT" ] || return 0
    say "stopping and disabling weftd.service"
    systemctl disable --now weftd.service || true
}

do_uninstall() {
    [ -f "$MANIFEST" ] || die "nothing to uninstall ($MANIFEST not found)"
    upgrade_manifest
    stop_unit
    local kind path backup dirs=()
    while IFS=$'\t' read -r kind path backup; do
        case $kind in
            dir) dirs+=("$path"); continue ;;
            file) ;;
            *) continue ;;
        esac
        rm -f "$path" "$path.weft-new"
        if [ -n "$backup" ] && { [ -e "$backup" ] || [ -L "$backup" ]; }; then mv "$backup" "$path"; fi
        say "removed $path${backup:+ (restored the original)}"
    done <"$MANIFEST"
    rm -f "$MANIFEST"
    # Deepest first: a directory sorts after its parent.
    if [ ${#dirs[@]} -gt 0 ]; then
        while IFS= read -r path; do
            if rmdir "$path" 2>/dev/null; then say "removed $path/"
            elif [ -d "$path" ]; then say "kept $path/ (not empty)"
            fi
        done < <(printf '%s\n' "${dirs[@]}" | sort -ru)
    fi
    if systemd_running; then systemctl daemon-reload; fi
}

case $ACTION in
    install) do_install; [ $DEMO = 0 ] || run_demo ;;
    uninstall) do_uninstall ;;
esac
