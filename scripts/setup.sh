#!/bin/sh
# Install what tcptrace-ebpf needs on Debian 12 (run as root), idempotently:
#   scripts/setup.sh          system packages + virtual environment (.venv) with the tool
#   scripts/setup.sh --test   the same, plus what the test suite needs
#   scripts/setup.sh --bench  the same, plus what bench/run drives (nginx, wrk,
#                             iperf3 for --workload bulk, bcc's tcpstates)
#
# BCC compiles the BPF program at run time against kernel headers. When the
# distribution has no headers package for the running kernel (custom or
# cloud kernels), the distribution's default headers are installed instead
# and `tcptrace-ebpf doctor --fix` points BCC at them: the program reads
# only tracepoint arguments and BTF offsets, so headers of another kernel
# version are enough. This script says when it does that.
set -eu

cd "$(dirname "$0")/.."
WANT_TEST=0
WANT_BENCH=0
[ "${1:-}" = "--test" ] && WANT_TEST=1
[ "${1:-}" = "--bench" ] && WANT_BENCH=1

say() { printf 'setup: %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
    say "must run as root (it installs system packages): sudo $0 $*" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    say "this script knows Debian/Ubuntu (apt-get); on other systems install BCC's Python bindings and kernel headers, then: python3 -m venv --system-site-packages .venv && .venv/bin/pip install ." >&2
    exit 1
fi

RELEASE=$(uname -r)
ARCH=$(dpkg --print-architecture)
PACKAGES="python3-bpfcc python3-venv python3-pip iproute2"
if [ "$WANT_TEST" -eq 1 ]; then
    # netns + nftables for the timeout scenario, bpftool for the BTF reader's
    # cross-check, prometheus for promtool and the end-to-end scrape,
    # systemd for systemd-analyze, openssl for TLS test certificates,
    # util-linux for setpriv/unshare, podman + runc + busybox-static for the
    # test with a real container (an image imported from a local root
    # filesystem: nothing is pulled).
    PACKAGES="$PACKAGES nftables bpftool prometheus systemd openssl util-linux"
    PACKAGES="$PACKAGES podman runc busybox-static"
fi
if [ "$WANT_BENCH" -eq 1 ]; then
    PACKAGES="$PACKAGES nginx-light wrk iperf3 bpfcc-tools"
fi

missing=""
for package in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing="$missing $package"
done

# Debian's prometheus package would start a server on :9090 where an init
# system runs; the tests start their own, so apt_install keeps services from
# starting with a policy-rc.d, unless the host has a policy of its own. Ours
# goes away on every way out (a failed apt-get under set -e, Ctrl-C), or it
# would stop every later package's services from starting.
POLICY=/usr/sbin/policy-rc.d
own_policy=0
remove_own_policy() {
    if [ "$own_policy" -eq 1 ]; then
        rm -f "$POLICY"
        own_policy=0
    fi
}
trap remove_own_policy EXIT
trap 'exit 129' HUP
trap 'exit 130' INT
trap 'exit 143' TERM

updated=0
apt_install() {
    if [ "$updated" -eq 0 ]; then
        say "apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        updated=1
    fi
    say "installing:$*"
    if [ ! -e "$POLICY" ] && [ ! -L "$POLICY" ]; then
        own_policy=1
        printf '#!/bin/sh\nexit 101\n' > "$POLICY"
        chmod +x "$POLICY"
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
    remove_own_policy
}
[ -n "$missing" ] && apt_install $missing

# Kernel headers for BCC: the running kernel's if the archive has them,
# otherwise the distribution's default ones (doctor --fix links them below).
if [ ! -e "/lib/modules/$RELEASE/build" ]; then
    if apt-cache show "linux-headers-$RELEASE" >/dev/null 2>&1; then
        apt_install "linux-headers-$RELEASE"
    elif ! ls -d /usr/src/linux-headers-*-"$ARCH" >/dev/null 2>&1; then
        say "no headers package for kernel $RELEASE in the archive: installing linux-headers-$ARCH (another version; enough for this tracepoint-only program)"
        apt_install "linux-headers-$ARCH"
    fi
fi

if [ ! -x .venv/bin/python ]; then
    say "creating .venv (with system site packages, where BCC's bindings live)"
    /usr/bin/python3 -m venv --system-site-packages .venv
fi
if [ "$WANT_TEST" -eq 1 ]; then
    .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
else
    .venv/bin/pip install -q --disable-pip-version-check -e .
fi

# Mount tracefs and link kernel headers if needed; then check everything.
.venv/bin/tcptrace-ebpf doctor --fix
