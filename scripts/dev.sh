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
# arm64 test guests: QEMU's aarch64 system emulator and a cross compiler with static glibc (guest programs).
command -v qemu-system-aarch64 >/dev/null || need+=(qemu-system-arm)
command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu)
[ -e /usr/aarch64-linux-gnu/lib/libc.a ] || need+=(libc6-dev-arm64-cross)
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
  test) .venv/bin/python -m aradia.lab.images 5.10 6.1 6.12
        # the other Debian release's QEMU (on 12: 13's QEMU 10; on 13: 12's QEMU 7.2), unpacked
        # under the cache and run through a wrapper (src/aradia/lab/otherqemu.py)
        other_qemu=$(.venv/bin/python -m aradia.lab.otherqemu) ;;
esac

# The guest-facing tracing, attach and plugin tests, run a second time on the other QEMU (the 6.1 guests:
# 2 and 4 vCPUs: the other kernels test the kernels, not QEMU; ~10 min added).
OTHER_QEMU_TESTS=(tests/test_attach.py tests/test_trace.py tests/test_plugin.py tests/test_plugin_trace.py
                  tests/test_count.py tests/test_gdbrsp.py -k "not 5.10 and not 6.12 and not 1cpu")

case "$target" in
  setup) echo "set up; activate with: . .venv/bin/activate" ;;
  demo) exec .venv/bin/aradia demo "$@" ;;
  test)
    .venv/bin/ruff check src tests bench
    installed=$(qemu-system-x86_64 --version | head -1)
    other=$("$other_qemu" --version | head -1)
    echo "=== run 1: the whole suite on the installed QEMU: $installed ==="
    rc1=0; .venv/bin/python -m pytest --durations=25 "$@" || rc1=$?
    echo "=== run 2: tracing, attach and plugin tests on the other release's QEMU: $other ($other_qemu) ==="
    # arguments (a selection of tests) are run on both QEMUs; none: the whole suite, then the set above
    [ $# -gt 0 ] && OTHER_QEMU_TESTS=("$@")
    rc2=0; ARADIA_QEMU=$other_qemu .venv/bin/python -m pytest "${OTHER_QEMU_TESTS[@]}" || rc2=$?
    echo "=== run 1 ($installed): $([ $rc1 = 0 ] && echo passed || echo "FAILED (exit $rc1)") ==="
    echo "=== run 2 ($other): $([ $rc2 = 0 ] && echo passed || echo "FAILED (exit $rc2)") ==="
    [ $rc1 = 0 ] && [ $rc2 = 0 ] ;;
  *) echo "usage: $0 [setup|demo|test]" >&2; exit 2 ;;
esac
