#!/usr/bin/env bash
# Installs every prerequisite berth needs to build, test and benchmark on Debian 12.
# Idempotent and fast when everything is already present (each step checks first).
set -euo pipefail

log() { printf 'setup: %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  echo "setup: must run as root (apt-get, bpffs, cgroups)" >&2
  exit 1
fi

APT_PACKAGES=(
  llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev   # bpf-linker (LLVM 22)
  build-essential pkg-config                           # -sys crates
  busybox-static                                       # built-in CT template
  debootstrap                                          # `berth template build debian`
  iproute2 iperf3 iputils-ping procps                  # tests: netns, traffic, sysctl
  util-linux bsdutils                                  # unshare, nsenter, losetup, script
  crun                                                 # benchmark control
  prometheus                                           # promtool, e2e scrape test
  postgresql openssl libssl-dev                        # fleet: central DB tests, TLS (native-tls)
  hyperfine                                            # whole-process timings
  xz-utils zstd tar                                    # template import formats
  e2fsprogs quota xfsprogs                             # project quotas (--diskspace)
  acl                                                  # import tests: setfacl/getfacl
  qemu-utils lzop                                      # OpenVZ import: ploop images, vzdump .tar.lzo
  man-db groff-base zsh fish                           # cli tests: man -l, completion -n
  curl python3-venv                                    # api tests: unix-socket client, validator venv
  bats jq                                              # testbed fixtures: the bats helpers' test
  openssh-server openssh-client rsync                  # migrate: transport; tests start their own sshd
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  [[ "$p" == \#* ]] && continue
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing apt packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # No package may start a service on this machine (openssh-server would start sshd on :22;
  # the migration tests start their own inside a namespace): invoke-rc.d asks policy-rc.d,
  # and 101 means "not allowed". Only a policy this script put there is removed again.
  policy=/usr/sbin/policy-rc.d
  own_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    own_policy=1
  fi
  trap '[ "$own_policy" = 1 ] && rm -f "$policy"' EXIT
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  [ "$own_policy" = 1 ] && rm -f "$policy"
  own_policy=0
  trap - EXIT
else
  log "apt packages present"
fi

# Debian's prometheus package starts a server on :9090 by default; tests start their own.
if systemctl is-active --quiet prometheus 2>/dev/null; then
  systemctl disable --now prometheus >/dev/null 2>&1 || true
fi

# Debian's postgresql package creates a system cluster (main, :5432) and starts it; the fleet
# tests and `bench ship` run private clusters of their own, so it is stopped and set to start
# only by hand (start.conf `manual`), and never gets in the way of a port or a socket.
if command -v pg_lsclusters >/dev/null 2>&1; then
  pg_lsclusters -h 2>/dev/null | while read -r ver name _port status _rest; do
    conf="/etc/postgresql/$ver/$name/start.conf"
    if [ -f "$conf" ] && grep -qx 'auto' "$conf"; then
      echo manual >"$conf"
    fi
    case "$status" in
      online*) log "stopping the system PostgreSQL cluster $ver/$name"; pg_ctlcluster "$ver" "$name" stop || true ;;
    esac
  done
fi

export PATH="$HOME/.cargo/bin:$PATH"
if ! rustup toolchain list | grep -q '^nightly'; then
  log "installing nightly toolchain"
  rustup toolchain install nightly --profile minimal
fi
if ! rustup component list --toolchain nightly --installed | grep -q '^rust-src'; then
  log "adding rust-src to nightly"
  rustup component add rust-src --toolchain nightly
fi
# The fuzz targets (fuzz/, `cargo xtask fuzz`, and the short run in `cargo xtask test`).
if ! cargo fuzz --version 2>/dev/null | grep -q '^cargo-fuzz 0\.13'; then
  log "installing cargo-fuzz 0.13"
  cargo install --locked cargo-fuzz --version '^0.13'
else
  log "cargo-fuzz present"
fi

if ! bpf-linker --version 2>/dev/null | grep -q '^bpf-linker 0\.13'; then
  log "building bpf-linker 0.13 against LLVM 22 (~1 min)"
  LLVM_PREFIX=/usr/lib/llvm-22 cargo install --locked bpf-linker --version '^0.13' \
    --no-default-features --features llvm-22
else
  log "bpf-linker present"
fi

# CRIU >= 4.1 for `berth checkpoint`/`restore` (built from source where none works).
bash "$(dirname "$0")/setup-criu.sh"

if ! mountpoint -q /sys/fs/bpf; then
  log "mounting bpffs at /sys/fs/bpf"
  mount -t bpf bpf /sys/fs/bpf
fi
# The boot unit (start onboot CTs, stop all at shutdown): installed, not enabled or started —
# enabling it is the hoster's decision (`systemctl enable berth.service`).
unit_src="$(dirname "$0")/../userspace/systemd/berth.service"
unit_dst=/etc/systemd/system/berth.service
if ! cmp -s "$unit_src" "$unit_dst"; then
  log "installing $unit_dst (not enabled)"
  install -m 0644 "$unit_src" "$unit_dst"
  if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
else
  log "berth.service present"
fi
# berthd's API socket is group `berth` (root and the group's members may use it).
if ! getent group berth >/dev/null; then
  log "creating the system group berth (the API socket's group)"
  groupadd --system berth
fi
# The API test validates /v1/openapi.json with openapi-spec-validator from PyPI, in a venv of
# its own (Debian's python refuses pip installs into the system).
API_VENV=/opt/berth-venv
if ! "$API_VENV/bin/openapi-spec-validator" --version >/dev/null 2>&1; then
  log "installing openapi-spec-validator into $API_VENV"
  /usr/bin/python3 -m venv "$API_VENV"
  "$API_VENV/bin/pip" install -q 'openapi-spec-validator==0.9.0'
else
  log "openapi-spec-validator present"
fi
# The testbed's pytest fixture (testbed/fixtures/berth_testbed.py) is tested with this pytest.
if [ "$("$API_VENV/bin/python" -c 'import pytest; print(pytest.__version__)' 2>/dev/null)" != "8.3.4" ]; then
  log "installing pytest 8.3.4 into $API_VENV"
  [ -x "$API_VENV/bin/pip" ] || /usr/bin/python3 -m venv "$API_VENV"
  "$API_VENV/bin/pip" install -q 'pytest==8.3.4'
else
  log "pytest 8.3.4 present"
fi
log "done"
