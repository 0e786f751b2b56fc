#!/usr/bin/env bash
# Makes a working CRIU (>= 4.1) available for `berth checkpoint`/`restore`.
#
# Debian 12 ships criu 3.17, which fails `criu check` on kernels >= 6.13 (the vDSO layout changed;
# fixed in CRIU 4.1), and newer suites' binaries need a newer glibc. So when no installed criu
# passes `criu check`, this builds the source of Debian's newer package into /usr/local. The source
# is fetched through a temporary apt source list under /tmp that points at the Debian mirror this
# machine's apt is already configured with; /etc/apt is never changed.
# Idempotent: the fast path is a criu that already passes `criu check`.
set -euo pipefail

log() { printf 'setup-criu: %s\n' "$*" >&2; }

CRIU_MIN_MAJOR=4
CRIU_MIN_MINOR=1
# The newer suite whose source package is built; sid first, trixie as the fallback.
CRIU_SUITES=(sid trixie)
BUILD_DEPS=(
  libprotobuf-c-dev protobuf-c-compiler protobuf-compiler libprotobuf-dev python3-protobuf
  libnl-3-dev libnet1-dev libcap-dev libbsd-dev libnftables-dev libgnutls28-dev
  pkg-config build-essential dpkg-dev
)

criu_ok() {
  local bin=$1 ver major minor
  [ -x "$bin" ] || return 1
  ver=$("$bin" --version 2>/dev/null | sed -n 's/^Version: *//p')
  major=${ver%%.*}
  minor=${ver#*.}
  minor=${minor%%.*}
  [[ "$major" =~ ^[0-9]+$ && "$minor" =~ ^[0-9]+$ ]] || return 1
  if [ "$major" -lt "$CRIU_MIN_MAJOR" ] ||
    { [ "$major" -eq "$CRIU_MIN_MAJOR" ] && [ "$minor" -lt "$CRIU_MIN_MINOR" ]; }; then
    return 1
  fi
  "$bin" check >/dev/null 2>&1
}

for bin in /usr/local/sbin/criu /usr/sbin/criu "$(command -v criu 2>/dev/null || true)"; do
  if [ -n "$bin" ] && criu_ok "$bin"; then
    log "criu present ($bin, $("$bin" --version | sed -n 's/^Version: *//p'))"
    exit 0
  fi
done

# The mirror the machine already uses (deb822 .sources or one-line .list), so the fetch goes where
# the hoster's apt goes (a local mirror or proxy keeps working).
mirror=""
for f in /etc/apt/sources.list.d/*.sources; do
  [ -f "$f" ] || continue
  mirror=$(awk '/^URIs:/ {for (i = 2; i <= NF; i++) if ($i ~ /\/debian\/?$/) {print $i; exit}}' "$f")
  [ -n "$mirror" ] && break
done
if [ -z "$mirror" ]; then
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    mirror=$(awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^https?:.*\/debian\/?$/) {print $i; exit}}' "$f")
    [ -n "$mirror" ] && break
  done
fi
mirror=${mirror:-http://deb.debian.org/debian}
log "no working criu >= $CRIU_MIN_MAJOR.$CRIU_MIN_MINOR; building from Debian's source package ($mirror)"

missing=()
for p in "${BUILD_DEPS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing build dependencies: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

work=$(mktemp -d /tmp/berth-criu.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/src" "$work/parts"
for suite in "${CRIU_SUITES[@]}"; do
  printf 'deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] %s %s main\n' \
    "$mirror" "$suite" >>"$work/sources.list"
done
# Only the temporary list and state dir: nothing under /etc/apt or /var/lib/apt changes.
APT_OPTS=(
  -o "Dir::Etc::sourcelist=$work/sources.list"
  -o "Dir::Etc::sourceparts=$work/parts"
  -o "Dir::State::Lists=$work/lists"
  -o "APT::Get::List-Cleanup=0"
)
apt-get "${APT_OPTS[@]}" update -qq
(cd "$work/src" && apt-get "${APT_OPTS[@]}" source --tar-only -qq criu >/dev/null)
tarball=$(ls "$work"/src/criu_*.orig.tar.* | head -n1)
log "building $(basename "$tarball") (about 80 s)"
tar -C "$work/src" -xf "$tarball"
srcdir=$(find "$work/src" -mindepth 1 -maxdepth 1 -type d -name 'criu*' | head -n1)
# Docs need asciidoc/xmlto; only the binary is built and installed.
nice -n 19 make -C "$srcdir" -j2 criu >"$work/build.log" 2>&1 || {
  tail -n 40 "$work/build.log" >&2
  log "criu build failed"
  exit 1
}
install -D -m 0755 "$srcdir/criu/criu" /usr/local/sbin/criu

if ! criu_ok /usr/local/sbin/criu; then
  /usr/local/sbin/criu check >&2 || true
  log "built criu does not pass 'criu check'"
  exit 1
fi
log "criu $(/usr/local/sbin/criu --version | sed -n 's/^Version: *//p') installed: $(/usr/local/sbin/criu check 2>&1 | tail -n1)"
