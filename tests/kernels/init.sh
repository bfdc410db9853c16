#!/bin/busybox sh
# Stage 1 of a kernel-matrix guest: the initramfs's /init (busybox sh).
#
# tests/kernels/matrix.py packs this file as /init, with a static busybox, the
# modules booting needs (decompressed, in load order) and /kmatrix.conf. It
# loads those modules, mounts the host's root filesystem (virtio-fs tag
# "hostroot", read-only) under a tmpfs overlay, mounts the results share
# (virtio-fs tag "results") at /run/kmatrix and hands over to stage 2,
# tests/kernels/guest.sh, read from the host's root like everything else.
# Any failure prints a "@@KMATRIX-BOOT-FAILED" line and powers the VM off.

/bin/busybox mkdir -p /proc /sys /dev /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

fail() {
    echo "@@KMATRIX-BOOT-FAILED $*"
    poweroff -f
    sleep 5
    exit 1
}

mount -t devtmpfs devtmpfs /dev || fail "mount devtmpfs"
mount -t proc proc /proc || fail "mount proc"
mount -t sysfs sysfs /sys || fail "mount sysfs"

. /kmatrix.conf

echo "kmatrix: stage 1 ($KMATRIX_RELEASE) after $(cut -d' ' -f1 /proc/uptime) s"
for module in $KMATRIX_BOOT_MODULES; do
    insmod "/modules/$module" || fail "insmod $module"
done

mkdir -p /lower /rw /newroot
mount -t virtiofs -o ro hostroot /lower || fail "mount the host root (virtio-fs tag hostroot)"
mount -t tmpfs -o mode=0755 tmpfs /rw || fail "mount tmpfs for the overlay"
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot ||
    fail "mount the overlay"

# /run and /tmp on the host's disk hold the host's live state (sockets, pid
# files, netns mounts): the guest gets empty ones.
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /newroot/run || fail "mount /run"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /newroot/tmp || fail "mount /tmp"
# A repository that lives there (a CI checkout in /tmp, say) stays at its
# path: the host's copy under an overlay of its own, writable as the rest.
case "$KMATRIX_REPO" in
/tmp/* | /run/*)
    mkdir -p /rw/repo/upper /rw/repo/work "/newroot$KMATRIX_REPO"
    mount -t overlay overlay \
        -o "lowerdir=/lower$KMATRIX_REPO,upperdir=/rw/repo/upper,workdir=/rw/repo/work" \
        "/newroot$KMATRIX_REPO" || fail "mount the repository at $KMATRIX_REPO"
    ;;
esac
mkdir -p /newroot/run/kmatrix
mount -t virtiofs results /newroot/run/kmatrix || fail "mount the results share (tag results)"
cp /kmatrix.conf /newroot/run/kmatrix.conf

for fs in dev proc sys; do
    mount --move "/$fs" "/newroot/$fs" || fail "move /$fs"
done
[ -f "/newroot$KMATRIX_REPO/tests/kernels/guest.sh" ] ||
    fail "$KMATRIX_REPO/tests/kernels/guest.sh not found on the host root"
exec switch_root /newroot /bin/sh "$KMATRIX_REPO/tests/kernels/guest.sh"
fail "switch_root"
