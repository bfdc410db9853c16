#!/usr/bin/env python3
"""Run the test suite inside other kernels: `make test-kernels` (see README.md here).

For each kernel series asked for (default 6.1 and 6.12), the newest Debian
cloud kernel of that series the archive offers is downloaded with `apt-get
download` and unpacked with `dpkg-deb -x` (never installed) into
.cache/kernels/<release>/, with its headers, and booted in a throw-away qemu
VM whose root filesystem is this machine's own / exported read-only over
virtio-fs, under a tmpfs overlay. pytest runs inside, from this repository
and its .venv; its output streams here, and a summary line per kernel ends
the run. Exit status 0 only if every kernel booted and pytest passed.

Standard library only; run by the repository's .venv/bin/python, as root.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import gzip
import io
import lzma
import os
import re
import resource
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CACHE = REPO / ".cache" / "kernels"
RESULTS = CACHE / "results"

QEMU = "/usr/bin/qemu-system-x86_64"
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"  # qemu's C daemon, from qemu-system-common
# Debian packages installed on the host (with apt-get) when missing, by a file they provide.
HOST_PACKAGES = {
    "qemu-system-x86": QEMU,
    "qemu-system-common": VIRTIOFSD,
    "kmod": "/sbin/depmod",
}
# Modules the guest needs before it can mount its root (skipped where built in).
BOOT_MODULES = ("virtio_pci", "virtiofs", "overlay")
OPTIONAL_BOOT_MODULES = ("virtio_rng",)  # entropy for early getrandom()
FLAVOUR = "cloud-amd64"

PREFIX = "kmatrix"
BOOT_FAILED = "@@KMATRIX-BOOT-FAILED"
RESULT = re.compile(r"@@KMATRIX-RESULT rc=(\d+)")
READY = "kmatrix: ready after"
PROBE_OK = "@@KMATRIX-PROBE-OK"

_print_lock = threading.Lock()


def say(message: str) -> None:
    with _print_lock:
        print(f"{PREFIX}: {message}", flush=True)


class MatrixError(Exception):
    pass


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=True, text=True, capture_output=True)


# --------------------------------------------------------------------------- host set-up


def ensure_host_packages() -> None:
    missing = [pkg for pkg, path in HOST_PACKAGES.items() if not os.path.exists(path)]
    if not missing:
        return
    say(f"installing with apt-get: {' '.join(missing)}")
    apt_update()
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )


_apt_updated = threading.Event()


def apt_update() -> None:
    """apt-get update, at most once per run."""
    if not _apt_updated.is_set():
        say("apt-get update")
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        _apt_updated.set()


def apt_candidates(packages: list[str]) -> dict[str, str]:
    """Package name -> candidate version, for those the archive really has."""
    if not packages:
        return {}
    out = subprocess.run(
        ["apt-cache", "policy", *packages], check=False, text=True, capture_output=True
    ).stdout
    found: dict[str, str] = {}
    name = None
    for line in out.splitlines():
        if line and not line.startswith(" "):
            name = line.rstrip(":")
        elif name and line.strip().startswith("Candidate:"):
            version = line.split(":", 1)[1].strip()
            if version and version != "(none)":
                found[name] = version
    return found


def release_key(release: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", release))


def resolve_release(series: str) -> str:
    """The newest <series> cloud kernel the archive has an image and headers for."""
    if re.fullmatch(r"\d+\.\d+\.\d+\S*-" + FLAVOUR, series):
        return series  # a release pinned in KERNELS
    if not re.fullmatch(r"\d+\.\d+", series):
        raise MatrixError(f"{series!r}: expected a series such as 6.1, or a full release")
    pattern = re.compile(
        r"linux-image-(" + re.escape(series) + r"\.\d+\S*-" + FLAVOUR + r")-unsigned"
    )
    for attempt in range(2):
        names = subprocess.run(
            ["apt-cache", "pkgnames", f"linux-image-{series}."],
            check=False,
            text=True,
            capture_output=True,
        ).stdout.split()
        releases = sorted(
            {m.group(1) for m in map(pattern.fullmatch, names) if m},
            key=release_key,
            reverse=True,
        )
        wanted = [f"linux-image-{r}-unsigned" for r in releases]
        wanted += [f"linux-headers-{r}" for r in releases]
        have = apt_candidates(wanted)
        for release in releases:
            if f"linux-image-{release}-unsigned" in have and f"linux-headers-{release}" in have:
                return release
        if attempt == 0:
            apt_update()
    raise MatrixError(f"the archive has no {FLAVOUR} kernel of series {series} with headers")


def header_dependencies(release: str) -> list[str]:
    """linux-headers-<release>'s -common and linux-kbuild-* packages."""
    out = run(["apt-cache", "depends", f"linux-headers-{release}"]).stdout
    deps = []
    for line in out.splitlines():
        m = re.match(r"\s*\|?Depends: (\S+)$", line)
        if m and m.group(1).startswith(("linux-headers-", "linux-kbuild-")):
            deps.append(m.group(1))
    return deps


def apt_download_unpack(packages: list[str], into: Path) -> dict[str, str]:
    """apt-get download, then dpkg-deb -x each into `into` (nothing is installed)."""
    versions = apt_candidates(packages)
    missing = sorted(set(packages) - set(versions))
    if missing:
        raise MatrixError(f"not in the archive: {' '.join(missing)}")
    with tempfile.TemporaryDirectory(prefix="kmatrix-debs-") as debs:
        say(f"downloading {' '.join(packages)}")
        subprocess.run(
            ["apt-get", "download", "-qq", "-o", "APT::Sandbox::User=root", *packages],
            check=True,
            cwd=debs,
        )
        for deb in sorted(Path(debs).glob("*.deb")):
            run(["dpkg-deb", "-x", str(deb), str(into)])
    return versions


@dataclass
class Kernel:
    series: str
    release: str
    tree: Path  # the unpacked packages: boot/, lib/modules/, usr/src/, usr/lib/

    @property
    def vmlinuz(self) -> Path:
        return self.tree / "boot" / f"vmlinuz-{self.release}"

    @property
    def modules(self) -> Path:
        return self.tree / "lib" / "modules" / self.release


def fetch_kernel(series: str) -> Kernel:
    release = resolve_release(series)
    final = CACHE / release
    tree = final / "root"
    if (final / "complete").exists():
        say(f"{series}: {release} (cached in {final.relative_to(REPO)})")
        return Kernel(series, release, tree)
    partial = CACHE / f"{release}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "root").mkdir(parents=True)
    packages = [
        f"linux-image-{release}-unsigned",
        f"linux-headers-{release}",
        *header_dependencies(release),
    ]
    versions = apt_download_unpack(packages, partial / "root")
    kernel = Kernel(series, release, partial / "root")
    usr_modules = kernel.tree / "usr" / "lib" / "modules" / release
    if not kernel.modules.exists() and usr_modules.exists():
        kernel.modules.parent.mkdir(parents=True, exist_ok=True)
        kernel.modules.symlink_to(usr_modules)
    for needed in (kernel.vmlinuz, kernel.modules, kernel.tree / "usr" / "src"):
        if not needed.exists():
            raise MatrixError(f"{release}: {needed} missing after unpacking")
    say(f"{release}: depmod")
    run(["depmod", "-b", str(kernel.tree), release])
    (partial / "packages").write_text("".join(f"{p} {v}\n" for p, v in sorted(versions.items())))
    (partial / "complete").touch()
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    return Kernel(series, release, tree)


def fetch_busybox() -> Path:
    """A static busybox for the initramfs, unpacked into the cache (busybox-static
    conflicts with Debian's busybox, so it is not installed)."""
    version = apt_candidates(["busybox-static"]).get("busybox-static")
    if version is None:
        apt_update()
        version = apt_candidates(["busybox-static"]).get("busybox-static")
    if version is None:
        raise MatrixError("the archive has no busybox-static")
    final = CACHE / f"busybox-static_{re.sub(r'[^A-Za-z0-9.+~-]', '_', version)}"
    binary = final / "bin" / "busybox"
    if not binary.exists():
        partial = final.with_name(final.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        apt_download_unpack(["busybox-static"], partial)
        for candidate in (partial / "bin" / "busybox", partial / "usr" / "bin" / "busybox"):
            if candidate.exists() and candidate != partial / "bin" / "busybox":
                (partial / "bin").mkdir(exist_ok=True)
                shutil.copy2(candidate, partial / "bin" / "busybox")
        if not (partial / "bin" / "busybox").exists():
            raise MatrixError("busybox-static: no bin/busybox in the package")
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
    return binary


# --------------------------------------------------------------------------- initramfs


class Cpio:
    """An uncompressed newc archive, the format the kernel unpacks as initramfs."""

    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.ino = 1

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        encoded = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0]
        self.ino += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.out.write(header + encoded)
        self.out.write(b"\0" * (-(len(header) + len(encoded)) % 4))
        self.out.write(data)
        self.out.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def bytes(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.out.getvalue()


def read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(data)
    if path.suffix == ".gz":
        return gzip.decompress(data)
    if path.suffix == ".zst":
        return run_bytes(["zstd", "-dc", str(path)])
    return data


def run_bytes(argv: list[str]) -> bytes:
    return subprocess.run(argv, check=True, capture_output=True).stdout


def module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    return re.sub(r"\.ko(\.\w+)?$", "", base).replace("-", "_")


def boot_modules(kernel: Kernel) -> list[Path]:
    """The boot modules that are not built in, dependencies first."""
    deps: dict[str, list[str]] = {}
    paths: dict[str, str] = {}
    for line in (kernel.modules / "modules.dep").read_text().splitlines():
        target, _, rest = line.partition(":")
        paths[module_name(target)] = target
        deps[module_name(target)] = [module_name(d) for d in rest.split()]
    builtin = {module_name(p) for p in (kernel.modules / "modules.builtin").read_text().split()}
    order: list[str] = []

    def visit(name: str) -> None:
        if name in order or name in builtin:
            return
        for dep in deps[name]:
            visit(dep)
        order.append(name)

    for name in (*BOOT_MODULES, *OPTIONAL_BOOT_MODULES):
        if name in builtin:
            continue
        if name not in paths:
            if name in OPTIONAL_BOOT_MODULES:
                continue
            raise MatrixError(f"{kernel.release}: module {name} neither built in nor shipped")
        visit(name)
    return [kernel.modules / paths[name] for name in order]


def host_cgroups() -> str:
    """The host's cgroup mounts as 'fstype mountpoint options' lines, for the guest."""
    lines = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            sep = fields.index("-")
            point = fields[4].replace("\\040", " ")
            fstype, options = fields[sep + 1], fields[sep + 3]
            if not point.startswith("/sys/fs/cgroup"):
                continue
            if fstype == "tmpfs" and point == "/sys/fs/cgroup":
                lines.append("tmpfs /sys/fs/cgroup mode=0755")
            elif fstype in ("cgroup", "cgroup2"):
                kept = [
                    o
                    for o in options.split(",")
                    if o not in ("rw", "ro") and not o.startswith("release_agent")
                ]
                if fstype == "cgroup" and all("=" in o or o == "xattr" for o in kept):
                    kept.insert(0, "none")  # a named hierarchy without controllers
                lines.append(f"{fstype} {point} {','.join(kept) or '-'}")
    return "\n".join(lines) or "cgroup2 /sys/fs/cgroup -"


def shell_assignments(values: dict[str, str]) -> str:
    return "".join(f"{key}={shlex.quote(value)}\n" for key, value in values.items())


def build_initramfs(
    busybox: Path, kernel: Kernel | None, init: bytes, conf: dict[str, str], path: Path
) -> None:
    cpio = Cpio()
    for directory in ("bin", "dev", "proc", "sys", "modules"):
        cpio.dir(directory)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    cpio.file("init", init, 0o755)
    names = []
    if kernel is not None:
        for module in boot_modules(kernel):
            name = module_name(str(module)) + ".ko"
            cpio.file(f"modules/{name}", read_module(module))
            names.append(name)
    conf = dict(conf, KMATRIX_BOOT_MODULES=" ".join(names))
    cpio.file("kmatrix.conf", shell_assignments(conf).encode())
    path.write_bytes(cpio.bytes())


# --------------------------------------------------------------------------- processes


class Processes:
    """Every process this run starts, ended by pid (and its own process group) on exit."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.procs: list[subprocess.Popen[bytes]] = []
        self.tmpdirs: list[Path] = []
        self.closing = threading.Event()

    def tmpdir(self, prefix: str) -> Path:
        path = Path(tempfile.mkdtemp(prefix=prefix))
        with self.lock:
            self.tmpdirs.append(path)
        return path

    def start(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        with self.lock:
            if self.closing.is_set():
                raise MatrixError("stopping")
            # Own session: Ctrl-C reaches only this script, which ends them in order.
            # setpriv --pdeathsig: they die with the thread that started them even
            # if this script is killed outright.
            proc = subprocess.Popen(
                ["setpriv", "--pdeathsig", "KILL", "--", *argv],
                start_new_session=True,
                **kwargs,
            )
            self.procs.append(proc)
            return proc

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 5) -> None:
        """End proc and what it started in its own process group. Signals go to the
        group only while its leader is not reaped yet, so the id cannot be reused."""
        if proc.poll() is not None:
            return  # already reaped; its helpers die with it (pdeathsig)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def stop_all(self) -> None:
        self.closing.set()
        with self.lock:
            procs = list(reversed(self.procs))
        for proc in procs:
            self.stop(proc, grace=3)
        with self.lock:
            tmpdirs, self.tmpdirs = self.tmpdirs, []
        for path in tmpdirs:
            shutil.rmtree(path, ignore_errors=True)


PROCS = Processes()


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 20
    while not path.exists():
        if proc.poll() is not None:
            raise MatrixError(f"{what} exited with {proc.returncode} before making its socket")
        if time.monotonic() > deadline:
            raise MatrixError(f"{what} made no socket in 20 s")
        time.sleep(0.05)


# --------------------------------------------------------------------------- read-only export


MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND = 32, 1024, 2048, 4096
MS_REC, MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = 16384, 1 << 18, 1 << 21, 1 << 24
CLONE_NEWNS = 0x00020000
MOUNT_FLAGS = {
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
    "strictatime": MS_STRICTATIME,
}


def exec_sandboxed(argv: list[str], writable: str | None) -> None:
    """Exec virtiofsd (argv) in a private mount namespace with its own /run.

    virtiofsd writes a lock file in /run/virtiofsd: a tmpfs there keeps it off
    the host. With `writable` (the directory of its socket), every mount in
    that namespace is made read-only but that directory: virtiofsd exports /
    as its namespace shows it, so the host cannot be written through it
    whatever the guest does. The host's own mounts are untouched (per-mount
    flags, in a copy of the namespace)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_void_p]

    def mount(source: bytes | None, target: bytes, fstype: bytes | None, flags: int) -> int:
        return int(libc.mount(source, target, fstype, flags, None))

    if libc.unshare(CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
    if mount(None, b"/", None, MS_REC | MS_PRIVATE) != 0:
        raise OSError(ctypes.get_errno(), "mount --make-rprivate /")
    if writable is not None:
        with open("/proc/self/mountinfo") as mountinfo:
            mounts = [line.split() for line in mountinfo]
        for fields in mounts:
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            flags = MS_REMOUNT | MS_BIND | MS_RDONLY
            for option in fields[5].split(","):
                flags |= MOUNT_FLAGS.get(option, 0)
            mount(None, point.encode(), None, flags)  # shadowed ones fail: unseen anyway
        for path in ("/", str(REPO)):
            if not os.statvfs(path).f_flag & os.ST_RDONLY:
                raise MatrixError(f"could not make {path} read-only for virtiofsd")
        where = writable.encode()
        if mount(where, where, None, MS_BIND) or mount(None, where, None, MS_REMOUNT | MS_BIND):
            raise OSError(ctypes.get_errno(), f"bind {writable} read-write")
    if mount(b"tmpfs", b"/run", b"tmpfs", MS_NOSUID | MS_NODEV) != 0:
        raise OSError(ctypes.get_errno(), "mount tmpfs /run")
    if writable is not None:
        # virtiofsd's sandbox pivots into its source, which cannot be the root
        # mount itself: export a recursive bind of it (flags, read-only, kept).
        os.mkdir("/run/root")
        if mount(b"/", b"/run/root", None, MS_BIND | MS_REC) != 0:
            raise OSError(ctypes.get_errno(), "bind / at /run/root")
        for path in ("/run/root", "/run/root" + str(REPO)):
            if not os.statvfs(path).f_flag & os.ST_RDONLY:
                raise MatrixError(f"could not make {path} read-only for virtiofsd")
        argv = [("source=/run/root" if arg == "source=/" else arg) for arg in argv]
    os.execv(argv[0], argv)


# --------------------------------------------------------------------------- one guest


@dataclass
class Options:
    accel: str
    smp: int
    memory: int
    timeout: float
    boot_timeout: float
    argv: list[str]  # the command run in the guest, from the repository
    shown: str
    prefix: bool
    quiet: bool


@dataclass
class Outcome:
    kernel: Kernel
    status: str = "not run"  # passed, failed, boot failed, timeout, error
    rc: int | None = None
    counts: dict[str, int] = field(default_factory=dict)
    wall: float = 0.0
    boot: float | None = None
    detail: str = ""


def guest_conf(kernel: Kernel, busybox: Path, options: Options) -> dict[str, str]:
    # As the host (20000 on the project's machines), at least 20000: the default
    # 1024 breaks tests (test_socket_map_full).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft = max(soft, 20000) if soft != resource.RLIM_INFINITY else soft
    if hard != resource.RLIM_INFINITY:
        hard = max(hard, soft)
    return {
        "KMATRIX_RELEASE": kernel.release,
        "KMATRIX_SERIES": kernel.series,
        "KMATRIX_REPO": str(REPO),
        "KMATRIX_KERNEL_TREE": str(kernel.tree),
        "KMATRIX_BUSYBOX": str(busybox),
        "KMATRIX_HOSTNAME": "kmatrix-" + kernel.series.replace(".", "-"),
        "KMATRIX_NOFILE_SOFT": "unlimited" if soft == resource.RLIM_INFINITY else str(soft),
        "KMATRIX_NOFILE_HARD": "unlimited" if hard == resource.RLIM_INFINITY else str(hard),
        "KMATRIX_CGROUPS": host_cgroups(),
        "KMATRIX_ARGV": shlex.join(options.argv),
        "KMATRIX_SHOWN": options.shown,
        "KMATRIX_MONITOR": str(env_int("KMATRIX_MONITOR", 0)),
    }


def qemu_argv(
    kernel: Kernel, initramfs: Path, sockets: dict[str, Path], accel: str, smp: int, memory: int
) -> list[str]:
    if accel == "kvm":
        machine = ["-accel", "kvm", "-cpu", "host"]
    else:
        machine = ["-accel", "tcg,thread=multi", "-cpu", "max"]
    argv = [
        QEMU,
        "-name",
        f"kmatrix-{kernel.series}",
        "-machine",
        "pc",
        *machine,
        "-smp",
        str(smp),
        "-m",
        f"{memory}M",
        # vhost-user needs the guest's memory shared with virtiofsd
        "-object",
        f"memory-backend-memfd,id=mem,size={memory}M,share=on",
        "-numa",
        "node,memdev=mem",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-chardev",
        "stdio,id=console,signal=off",
        "-serial",
        "chardev:console",
        "-device",
        "virtio-rng-pci",
        "-kernel",
        str(kernel.vmlinuz),
        "-initrd",
        str(initramfs),
        "-append",
        "console=ttyS0 panic=-1 quiet rdinit=/init",
    ]
    for tag, sock in sockets.items():
        argv += [
            "-chardev",
            f"socket,id={tag},path={sock}",
            "-device",
            f"vhost-user-fs-pci,chardev={tag},tag={tag}",
        ]
    return argv


def start_virtiofsd(
    source: Path, sock: Path, cache: str, read_only: bool, log: Path
) -> subprocess.Popen[bytes]:
    argv = [
        VIRTIOFSD,
        f"--socket-path={sock}",
        "-o",
        f"source={source}",
        "-o",
        f"cache={cache}",
        "-o",
        "sandbox=namespace",
        "-o",
        "log_level=err",
    ]
    wrapper = [sys.executable, str(Path(__file__).resolve()), "_exec-sandboxed"]
    argv = [*wrapper, *(["--read-only", str(sock.parent)] if read_only else []), "--", *argv]
    with open(log, "wb") as out:
        proc = PROCS.start(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_socket(sock, proc, f"virtiofsd for {source}")
    except MatrixError as err:
        raise MatrixError(f"{err}: {log.read_text(errors='replace').strip()}") from None
    return proc


def format_seconds(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"


def junit_counts(path: Path) -> dict[str, int]:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for suite in suites:
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def run_guest(kernel: Kernel, busybox: Path, options: Options) -> Outcome:
    outcome = Outcome(kernel)
    started = time.monotonic()
    tmp = PROCS.tmpdir(f"kmatrix-{os.getpid()}-{kernel.series}-")
    results_dir = RESULTS / kernel.release
    shutil.rmtree(results_dir, ignore_errors=True)
    results_dir.mkdir(parents=True)
    procs: list[subprocess.Popen[bytes]] = []
    prefix = f"[{kernel.series}] " if options.prefix else ""
    try:
        share = tmp / "results"
        share.mkdir()
        sockets = {"hostroot": tmp / "hostroot.sock", "results": tmp / "results.sock"}
        init = (HERE / "init.sh").read_bytes()
        build_initramfs(
            busybox, kernel, init, guest_conf(kernel, busybox, options), tmp / "initramfs"
        )
        for tag, source, cache in (("hostroot", Path("/"), "always"), ("results", share, "none")):
            log = results_dir / f"virtiofsd-{tag}.log"
            procs.append(start_virtiofsd(source, sockets[tag], cache, tag == "hostroot", log))
        argv = qemu_argv(
            kernel, tmp / "initramfs", sockets, options.accel, options.smp, options.memory
        )
        say(
            f"{kernel.series}: booting {kernel.release} "
            f"({options.accel}, {options.smp} CPU(s), {options.memory} MiB)"
        )
        qemu = PROCS.start(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        procs.append(qemu)
        markers: dict[str, str] = {}
        log_path = results_dir / "console.log"

        def pump() -> None:
            assert qemu.stdout is not None
            with open(log_path, "w") as log:
                for raw in qemu.stdout:
                    # what a terminal would show of a line rewritten with carriage returns
                    text = raw.decode(errors="replace").rstrip("\r\n")
                    line = next((p for p in reversed(text.split("\r")) if p.strip()), "")
                    log.write(line + "\n")
                    if READY in line and "ready" not in markers:
                        markers["ready"] = str(time.monotonic() - started)
                    if BOOT_FAILED in line:
                        markers["boot_failed"] = line.split(BOOT_FAILED, 1)[1].strip()
                    m = RESULT.search(line)
                    if m:
                        markers["rc"] = m.group(1)
                    if not options.quiet:
                        with _print_lock:
                            sys.stdout.write(prefix + line + "\n")
                            sys.stdout.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        while qemu.poll() is None:
            elapsed = time.monotonic() - started
            if elapsed > options.timeout:
                outcome.status = "timeout"
                outcome.detail = f"no result within {format_seconds(options.timeout)}: VM stopped"
            elif "ready" not in markers and elapsed > options.boot_timeout:
                outcome.status = "boot failed"
                outcome.detail = f"not up within {format_seconds(options.boot_timeout)}: VM stopped"
            else:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    qemu.wait(timeout=1)
                continue
            PROCS.stop(qemu)
        reader.join(timeout=10)
        outcome.wall = time.monotonic() - started
        if "ready" in markers:
            outcome.boot = float(markers["ready"])
        rc_file = share / "rc"
        if rc_file.exists() and rc_file.read_text().strip().isdigit():
            outcome.rc = int(rc_file.read_text())
        elif "rc" in markers:
            outcome.rc = int(markers["rc"])
        junit = share / "junit.xml"
        if junit.exists():
            shutil.copy2(junit, results_dir / "junit.xml")
            with contextlib.suppress(ET.ParseError, ValueError):
                outcome.counts = junit_counts(junit)
        if PROCS.closing.is_set():
            outcome.status = "interrupted"
        elif outcome.status in ("timeout", "boot failed"):
            pass
        elif outcome.rc is not None:
            outcome.status = "passed" if outcome.rc == 0 else "failed"
        elif "boot_failed" in markers:
            outcome.status = "boot failed"
            outcome.detail = markers["boot_failed"]
        else:
            outcome.status = "boot failed" if "ready" not in markers else "error"
            outcome.detail = (
                f"qemu exited with {qemu.returncode} and no result"
                f" (see {log_path.relative_to(REPO)})"
            )
        return outcome
    except MatrixError as err:
        outcome.status = "error"
        outcome.detail = str(err)
        outcome.wall = time.monotonic() - started
        return outcome
    finally:
        for proc in reversed(procs):
            PROCS.stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- accelerator


def probe_kvm(kernel: Kernel, busybox: Path, timeout: float = 30) -> bool:
    """Boot the kernel with KVM into an initramfs that prints a line and powers off."""
    init = f"#!/bin/busybox sh\n/bin/busybox echo {PROBE_OK}\n/bin/busybox poweroff -f\n".encode()
    with tempfile.TemporaryDirectory(prefix=f"kmatrix-{os.getpid()}-probe-") as tmp:
        initramfs = Path(tmp) / "initramfs"
        build_initramfs(busybox, None, init, {}, initramfs)
        argv = qemu_argv(kernel, initramfs, {}, "kvm", 1, 512)
        proc = PROCS.start(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            PROCS.stop(proc)
            return False
        finally:
            PROCS.stop(proc)
        return PROBE_OK.encode() in out


def choose_accel(wanted: str, kernel: Kernel, busybox: Path) -> str:
    if wanted in ("kvm", "tcg"):
        return wanted
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        say("accelerator: tcg (no usable /dev/kvm)")
        return "tcg"
    if Path("/sys/module/kvm_pvm").exists():
        say("accelerator: tcg (/dev/kvm is PVM, kvm_pvm, which cannot boot stock kernels)")
        return "tcg"
    t0 = time.monotonic()
    if probe_kvm(kernel, busybox):
        say(f"accelerator: kvm (a probe boot took {time.monotonic() - t0:.1f} s)")
        return "kvm"
    say("accelerator: tcg (a probe boot with KVM failed or hung)")
    return "tcg"


# --------------------------------------------------------------------------- main


def summary_line(outcome: Outcome) -> str:
    k = outcome.kernel
    head = f"{k.series} ({k.release}): {outcome.status.upper()}"
    c = outcome.counts
    if c:
        parts = [f"{c['passed']} passed", f"{c['failures']} failed", f"{c['skipped']} skipped"]
        if c["errors"]:
            parts.append(f"{c['errors']} errors")
        head += ", " + ", ".join(parts)
    elif outcome.rc is not None:
        head += f", exit {outcome.rc}"
    head += f", wall {format_seconds(outcome.wall)}"
    if outcome.boot is not None:
        head += f" (ready {outcome.boot:.1f}s after start)"
    if outcome.detail:
        head += f": {outcome.detail}"
    return head


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


def parse_args(argv: list[str]) -> argparse.Namespace:
    cpus = os.cpu_count() or 1
    parser = argparse.ArgumentParser(
        description="Run pytest inside Debian cloud kernels (make test-kernels).",
        epilog="Everything after -- goes to pytest (make test-kernels ARGS=...).",
    )
    parser.add_argument(
        "--kernels",
        default=os.environ.get("KERNELS") or "6.1 6.12",
        help="series (6.1) or full releases (6.1.0-57-cloud-amd64), space-separated",
    )
    parser.add_argument(
        "--accel",
        choices=("auto", "kvm", "tcg"),
        default=os.environ.get("KMATRIX_ACCEL") or "auto",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=env_int("KMATRIX_JOBS", 0),
        help="kernels booted at once (default: one per CPU, up to the number of kernels)",
    )
    parser.add_argument(
        "--smp",
        type=int,
        default=env_int("KMATRIX_SMP", 0),
        help="CPUs per guest (default: CPUs / jobs)",
    )
    parser.add_argument(
        "--memory", type=int, default=env_int("KMATRIX_MEMORY", 3072), help="MiB per guest"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=env_int("KMATRIX_TIMEOUT", 3600),
        help="seconds per kernel before its VM is stopped (default 3600)",
    )
    parser.add_argument(
        "--boot-timeout",
        type=float,
        default=env_int("KMATRIX_BOOT_TIMEOUT", 300),
        help="seconds a guest may take to come up (default 300; about 5 under TCG)",
    )
    parser.add_argument(
        "--command",
        default=os.environ.get("KMATRIX_COMMAND") or None,
        help="run this shell command in the guest (in the repository) instead of pytest",
    )
    parser.add_argument("--quiet", action="store_true", help="do not stream the guests' output")
    parser.add_argument("pytest_args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    kernels = args.kernels.split()
    if not kernels:
        parser.error("no kernels")
    args.kernel_list = list(dict.fromkeys(kernels))
    if args.jobs <= 0:
        args.jobs = max(1, min(len(args.kernel_list), cpus))
    if args.smp <= 0:
        args.smp = max(1, cpus // args.jobs)
    return args


def guest_command(args: argparse.Namespace) -> tuple[list[str], str]:
    env = {
        "HOME": "/root",
        "USER": "root",
        "LOGNAME": "root",
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        "TERM": os.environ.get("TERM", "dumb") if sys.stdout.isatty() else "dumb",
        "PYTHONUNBUFFERED": "1",
        "CI": os.environ.get("CI", ""),
    }
    env.update({k: v for k, v in os.environ.items() if k.startswith("TCPTRACE_")})
    env = {k: v for k, v in env.items() if v}
    prefix = ["env", "-i", *(f"{k}={v}" for k, v in env.items())]
    if args.command:
        return [*prefix, "sh", "-c", args.command], args.command
    pytest = [
        ".venv/bin/python",
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "--junitxml=/run/kmatrix/junit.xml",
        *args.pytest_args,
    ]
    return [*prefix, *pytest], shlex.join(pytest)


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """SIGTERM and SIGHUP end the run like Ctrl-C does: through the cleanup."""

    def handler(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def remove_stale_tmp() -> None:
    """Temp dirs of earlier runs that were killed outright (their pid is gone)."""
    for path in Path(tempfile.gettempdir()).glob("kmatrix-*-*"):
        m = re.match(r"kmatrix-(\d+)-", path.name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            shutil.rmtree(path, ignore_errors=True)


_run_lock: list[object] = []


def hold_run_lock() -> None:
    """One run at a time per clone: runs share the cache and results directories."""
    CACHE.mkdir(parents=True, exist_ok=True)
    lock = open(CACHE / ".lock", "w")  # noqa: SIM115 (held until the process exits)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        say("another run of the kernel matrix holds .cache/kernels/.lock: waiting for it")
        fcntl.flock(lock, fcntl.LOCK_EX)
    _run_lock.append(lock)


def main(argv: list[str]) -> int:
    if argv[:1] == ["_exec-sandboxed"]:
        own = argv[: argv.index("--")]
        writable = own[own.index("--read-only") + 1] if "--read-only" in own else None
        exec_sandboxed(argv[argv.index("--") + 1 :], writable)
        return 127
    args = parse_args(argv)
    if os.geteuid() != 0:
        say("must run as root (apt-get, virtiofsd, qemu)")
        return 2
    if not (REPO / ".venv" / "bin" / "python").exists():
        say("no .venv: run `make setup-test` first (make test-kernels does)")
        return 2
    remove_stale_tmp()
    outcomes: list[Outcome] = []
    threads: list[threading.Thread] = []
    with signals_raise():
        try:
            hold_run_lock()
            ensure_host_packages()
            CACHE.mkdir(parents=True, exist_ok=True)
            busybox = fetch_busybox()
            kernels = [fetch_kernel(series) for series in args.kernel_list]
            accel = choose_accel(args.accel, kernels[0], busybox)
            command, shown = guest_command(args)
            options = Options(
                accel=accel,
                smp=args.smp,
                memory=args.memory,
                timeout=args.timeout,
                boot_timeout=args.boot_timeout,
                argv=command,
                shown=shown,
                prefix=args.jobs > 1 and len(kernels) > 1,
                quiet=args.quiet,
            )
            say(
                f"{len(kernels)} kernel(s), {args.jobs} at a time, {args.smp} CPU(s) each; "
                f"timeout {format_seconds(args.timeout)} per kernel"
            )
            outcomes = [Outcome(k) for k in kernels]
            pending = list(range(len(kernels)))
            lock = threading.Lock()

            def worker() -> None:
                while True:
                    with lock:
                        if not pending or PROCS.closing.is_set():
                            return
                        index = pending.pop(0)
                    outcomes[index] = run_guest(kernels[index], busybox, options)
                    say(summary_line(outcomes[index]))

            threads += [threading.Thread(target=worker, daemon=True) for _ in range(args.jobs)]
            for thread in threads:
                thread.start()
            for thread in threads:
                while thread.is_alive():
                    thread.join(timeout=0.5)
        except KeyboardInterrupt as stop:
            say(f"interrupted ({str(stop) or 'SIGINT'}): stopping the VMs")
            PROCS.stop_all()
            for thread in threads:
                thread.join(timeout=15)
            return 130
        except (MatrixError, subprocess.CalledProcessError) as err:
            detail = getattr(err, "stderr", None) or ""
            say(f"error: {err}{': ' + detail.strip() if detail else ''}")
            return 2
        finally:
            PROCS.stop_all()
    say("summary:")
    for outcome in outcomes:
        say("  " + summary_line(outcome))
    return 0 if outcomes and all(o.status == "passed" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
