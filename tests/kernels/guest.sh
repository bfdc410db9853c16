#!/bin/sh
# Stage 2 of a kernel-matrix guest, PID 1 after switch_root (the host's /bin/sh).
#
# The root filesystem is the host's own / (read-only virtio-fs) under a tmpfs
# overlay; /run and /tmp are empty tmpfs; /run/kmatrix is the results share.
# This script makes the rest of a CI machine (API filesystems, cgroups, the
# kernel's modules and headers, loopback, limits), runs the command
# tests/kernels/matrix.py chose (pytest by default), writes its exit code to
# /run/kmatrix/rc, prints "@@KMATRIX-RESULT rc=N" and powers off. If this
# script dies, the kernel panics (PID 1 exited) and, booted with panic=-1 in
# a qemu started with -no-reboot, the VM ends all the same.
set -u
. /run/kmatrix.conf

say() { echo "kmatrix: $*"; }

finish() {
    echo "$1" >/run/kmatrix/rc
    sync
    echo "@@KMATRIX-RESULT rc=$1"
    "$KMATRIX_BUSYBOX" poweroff -f
    echo o >/proc/sysrq-trigger
    sleep 10
    exit "$1"
}

say "stage 2 after $(cut -d' ' -f1 /proc/uptime) s"

# API filesystems (proc, sys and dev were moved here by stage 1).
mkdir -p /dev/pts /dev/shm
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,gid=5 devpts /dev/pts
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
[ -e /dev/ptmx ] || ln -s pts/ptmx /dev/ptmx
mount -t tracefs tracefs /sys/kernel/tracing || say "WARNING: no tracefs"
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null || true
mount -t bpf bpf /sys/fs/bpf || say "WARNING: no bpffs"

# cgroups laid out as on the host (one "fstype mountpoint options" per line),
# with the kernel's own complaints about missing v1 controllers kept off the
# console (the note below says it once).
read -r console_level _ </proc/sys/kernel/printk
echo 1 >/proc/sys/kernel/printk
echo "$KMATRIX_CGROUPS" | while read -r fstype point options; do
    [ -n "$fstype" ] || continue
    mkdir -p "$point"
    if [ "$options" = "-" ]; then
        mount -t "$fstype" "$fstype" "$point"
    else
        mount -t "$fstype" -o "$options" "$fstype" "$point"
    fi 2>/dev/null || say "note: this kernel cannot mount $fstype ($options) at $point, as the host has it"
done
echo "$console_level" >/proc/sys/kernel/printk

# The kernel's modules (modprobe for veth, nf_tables, ...) and the matching
# headers (BCC's build/source links), from the unpacked packages on the host:
# bind mounts, so every path looks as if the packages were installed.
tree=$KMATRIX_KERNEL_TREE
mkdir -p "/lib/modules/$KMATRIX_RELEASE"
mount --bind "$tree/lib/modules/$KMATRIX_RELEASE" "/lib/modules/$KMATRIX_RELEASE"
for path in "$tree"/usr/src/* "$tree"/usr/lib/linux-kbuild-*; do
    [ -e "$path" ] || [ -L "$path" ] || continue
    target=${path#"$tree"}
    if [ -L "$path" ]; then
        [ -e "$target" ] || [ -L "$target" ] || ln -s "$(readlink "$path")" "$target"
    else
        mkdir -p "$target"
        mount --bind "$path" "$target"
    fi
done
echo /sbin/modprobe >/proc/sys/kernel/modprobe

ip link set lo up
echo "$KMATRIX_HOSTNAME" >/proc/sys/kernel/hostname
ulimit -Hn "$KMATRIX_NOFILE_HARD"
ulimit -Sn "$KMATRIX_NOFILE_SOFT"
umask 022

# KMATRIX_MONITOR=N: every N seconds, the guest's load, memory, the overlay's
# size and the processes that used most CPU on the console (to tell a slow guest from a
# busy host).
if [ "${KMATRIX_MONITOR:-0}" -gt 0 ]; then
    while sleep "$KMATRIX_MONITOR"; do
        echo "kmatrix-monitor: load $(cut -d' ' -f1-3 /proc/loadavg)," \
            "$(free -m | awk '/^Mem:/ {print $3 " MiB used, " $7 " MiB available"}')," \
            "overlay $(df -m / | awk 'NR == 2 {print $3}') MiB"
        ps -eo cputime,rss,etime,args --sort=-cputime | sed -n '2,5s/^/kmatrix-monitor:   /p' | cut -c1-160
    done &
fi

cd "$KMATRIX_REPO" || finish 126
say "$(uname -r), $(nproc) CPU(s), $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) MiB; running in $KMATRIX_REPO: $KMATRIX_SHOWN"
say "ready after $(cut -d' ' -f1 /proc/uptime) s"
eval "set -- $KMATRIX_ARGV"
"$@" </dev/null
finish $?
