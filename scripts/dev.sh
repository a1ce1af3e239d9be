#!/usr/bin/env bash
# Set up everything aradia needs on a fresh Debian 12/13 machine, then run one target:
#   bash scripts/dev.sh demo   - boot the default 6.1 guest and show what aradia sees
#   bash scripts/dev.sh test   - the whole test suite against real guests
#   bash scripts/dev.sh setup  - only set up
# Idempotent: a second run installs nothing and reuses the cached guests (~/.cache/aradia).
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:-setup}
shift || true

SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"

# System packages: QEMU, a C toolchain with static glibc (guest helper programs), an ssh client.
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v gcc >/dev/null || need+=(gcc)
[ -e /usr/lib/x86_64-linux-gnu/libc.a ] || need+=(libc6-dev)
command -v ssh >/dev/null || need+=(openssh-client)
command -v patch >/dev/null || need+=(patch)
[ -e /usr/share/keyrings/debian-archive-keyring.gpg ] || need+=(debian-archive-keyring)
command -v dpkg-deb >/dev/null || need+=(dpkg)
# The service's bus (NATS JetStream) in tests and the fleet demo; setpriv for the least-privilege test.
command -v nats-server >/dev/null || [ -x /usr/sbin/nats-server ] || need+=(nats-server)
command -v setpriv >/dev/null || need+=(util-linux)
# The extraction tests' ext4 disk image (mke2fs -d).
command -v mke2fs >/dev/null || [ -x /usr/sbin/mke2fs ] || need+=(e2fsprogs)
# bench/extract.py compares the AES key scan with Debian's aeskeyfind.
command -v aeskeyfind >/dev/null || need+=(aeskeyfind)
# The dashboard's tests drive Debian's chromium with Playwright (Playwright's own download is not used).
command -v chromium >/dev/null || need+=(chromium)
# Debian's own python3 (3.11 on 12, 3.13 on 13) when there is one: an interpreter every user may run,
# so the service can be run as an unprivileged user from this checkout (README, "Least privilege").
PY=${PYTHON:-$( [ -x /usr/bin/python3 ] && echo /usr/bin/python3 || echo python3 )}
command -v "$PY" >/dev/null || need+=(python3)
# Debian's python3 has no ensurepip (so no venv) without python3-venv.
"$PY" -c "import ensurepip" 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${need[@]}"
fi

# The Python environment (3.11+).
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,service,extract]'
# The dashboard's chart library (uPlot, pinned, integrity-checked) from the npm registry into the package.
.venv/bin/python scripts/vendor.py

# Test guests (Debian kernels + busybox/bash/dropbear initramfs), cached after the first build.
case "$target" in
  demo) .venv/bin/python -m aradia.lab.images 6.1 ;;
  test) .venv/bin/python -m aradia.lab.images 5.10 6.1 6.12 ;;
esac

case "$target" in
  setup) echo "set up; activate with: . .venv/bin/activate" ;;
  demo) exec .venv/bin/aradia demo "$@" ;;
  test)
    .venv/bin/ruff check src tests bench
    exec .venv/bin/python -m pytest "$@" ;;
  *) echo "usage: $0 [setup|demo|test]" >&2; exit 2 ;;
esac
