"""`tcptrace-ebpf doctor`: can this host run the tracer, and if not, the exact fix.

With --fix it applies the fixes that are safe to automate: mounting
tracefs, and pointing BCC at installed kernel headers when none match the
running kernel. The BPF program only reads tracepoint arguments (laid out
from tracefs at run time) and uses BTF offsets, so headers of another
version of the kernel are enough for it to compile.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..kernel.features import (
    KERNEL_FEATURES,
    OLDEST_SUPPORTED,
    REQUIRED,
    Features,
    detect_features,
    headers_dir,
    kernel_release,
    kernel_summary,
    unsupported_reason,
)
from ..kernel.tracefs import ensure_tracefs, find_tracefs

Echo = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class HeadersCandidate:
    build: Path  # the tree with generated headers and .config (Debian: ...-amd64)
    source: Path  # the tree with the sources (Debian: ...-common); may equal build
    version: tuple[int, ...]


_ARCH_FLAVOURS = {"x86_64": ("amd64", "generic"), "aarch64": ("arm64", "generic")}


def _version_of(name: str) -> tuple[int, ...]:
    match = re.search(r"(\d+(?:\.\d+)+)", name)
    return tuple(int(part) for part in match.group(1).split(".")) if match else ()


def find_headers_candidates(
    usr_src: Path = Path("/usr/src"), machine: str | None = None
) -> list[HeadersCandidate]:
    """Installed kernel header trees, best first (newest, matching this CPU)."""
    machine = machine or os.uname().machine
    flavours = _ARCH_FLAVOURS.get(machine, ())
    found = []
    try:
        entries = sorted(usr_src.iterdir())
    except OSError:
        return []
    for entry in entries:
        if not entry.name.startswith("linux-headers-") or not entry.is_dir():
            continue
        if not (entry / "include" / "generated").is_dir() and not (entry / ".config").is_file():
            continue  # a source-only tree (Debian's -common), not a build tree
        if flavours and not entry.name.endswith(flavours):
            continue
        source = entry
        makefile = entry / "Makefile"
        try:
            first = makefile.read_text().strip().splitlines()[0]
        except (OSError, IndexError):
            first = ""
        match = re.match(r"include\s+(\S+)/Makefile$", first)
        if match and Path(match.group(1)).is_dir():
            source = Path(match.group(1))
        found.append(HeadersCandidate(entry, source, _version_of(entry.name)))
    return sorted(found, key=lambda candidate: candidate.version, reverse=True)


def link_headers(
    release: str, candidate: HeadersCandidate, modules: Path = Path("/lib/modules")
) -> Path:
    """Point /lib/modules/<release>/{build,source} at `candidate`; returns the directory."""
    target = modules / release
    target.mkdir(parents=True, exist_ok=True)
    for name, path in (("build", candidate.build), ("source", candidate.source)):
        link = target / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(path)
    return target


class Report:
    def __init__(self, echo: Echo) -> None:
        self.echo = echo
        self.failed = False

    def ok(self, what: str) -> None:
        self.echo(f"  ok    {what}")

    def warn(self, what: str, fix: str | None = None) -> None:
        self.echo(f"  warn  {what}" + (f"\n        fix: {fix}" if fix else ""))

    def fail(self, what: str, fix: str) -> None:
        self.failed = True
        self.echo(f"  FAIL  {what}\n        fix: {fix}")


def run_doctor(fix: bool, echo: Echo) -> bool:
    """Print one line per check; True if tcptrace-ebpf can run here."""
    report = Report(echo)
    release = kernel_release()
    echo(f"tcptrace-ebpf doctor: kernel {release}")

    if os.geteuid() == 0:
        report.ok("running as root")
    else:
        report.fail("not root: loading BPF programs needs root", "run with sudo")

    try:
        import bcc  # noqa: F401
    except ImportError:
        report.fail(
            "BCC's Python bindings are not importable from this Python",
            "apt-get install python3-bpfcc, and use a venv made with --system-site-packages",
        )
    else:
        report.ok("BCC Python bindings importable")

    if os.geteuid() != 0:
        # tracefs, its tracepoint formats and a test load are root's only:
        # without root they cannot even be looked at.
        _check_headers(report, release, fix)
        echo(
            "  SKIP  tracefs, tracepoints and loading the BPF program (they need root): "
            "run 'sudo tcptrace-ebpf doctor'"
        )
        echo("tcptrace-ebpf doctor: problems found")
        return False

    if find_tracefs() is None and fix:
        try:
            ensure_tracefs()
            echo("        fixed: mounted tracefs at /sys/kernel/tracing")
        except Exception as err:  # reported below as a failure
            echo(f"        could not mount tracefs: {err}")
    if find_tracefs() is not None:
        report.ok(f"tracefs mounted at {find_tracefs()}")
    else:
        report.fail("tracefs is not mounted", "mount -t tracefs tracefs /sys/kernel/tracing")

    _check_headers(report, release, fix)

    features = detect_features()
    for name, capability in features.capabilities.items():
        if capability.available:
            report.ok(capability.detail)
        elif name not in REQUIRED:  # a missing required one: in check_kernel's line
            report.warn(capability.detail)
    check_kernel(report, features)

    _check_cgroups(report)

    if not report.failed:
        _check_load(report)
    echo(
        "tcptrace-ebpf doctor: "
        + ("all required checks passed" if not report.failed else "problems found")
    )
    return not report.failed


def check_kernel(report: Report, features: Features) -> None:
    """The running kernel against the README's "Kernels" table, from what
    detect_features() found: cannot be traced, degraded (and what it lacks),
    or everything there."""
    unsupported = unsupported_reason(features)
    if unsupported:
        report.fail(
            unsupported,
            f"Linux {OLDEST_SUPPORTED[0]}.{OLDEST_SUPPORTED[1]} or later, with tracepoints "
            "(CONFIG_TRACEPOINTS, tracefs mounted) and BPF (CONFIG_BPF_SYSCALL); the README's "
            "'Kernels' section says what each series gives",
        )
        return
    summary = kernel_summary(features)
    if any(not features.has(feature.capability) for feature in KERNEL_FEATURES):
        report.warn(summary)
    else:
        report.ok(summary)


def _check_cgroups(report: Report) -> None:
    """Whether owners' cgroup ids (bpf_get_current_cgroup_id(), cgroup v2) can
    be named: a v2 hierarchy must be mounted, whole, where we can walk it."""
    from ..host.workloads import DEFAULT_LOG_ROOT, Workloads, cgroup_id_of_pid, find_cgroup2_root

    root = find_cgroup2_root()
    if root is None:
        report.warn(
            "no cgroup v2 hierarchy mounted (cgroup v1 only): containers and pods are named "
            "only for CLOSE_WAIT holders (from /proc), not in trace, lifecycles or timewait",
            "mount -t cgroup2 none /sys/fs/cgroup/unified, or boot with "
            "systemd.unified_cgroup_hierarchy=1",
        )
        return
    own = cgroup_id_of_pid(os.getpid(), root=root)
    if not own or Workloads(cgroup_root=root).path_of(own) is None:
        report.warn(
            f"cgroup v2 at {root}, but this process's cgroup id does not resolve there "
            "(another cgroup namespace?): owners' containers and pods stay unnamed",
            "mount the host's cgroup v2 tree and set TCPTRACE_CGROUP2_ROOT to it",
        )
        return
    hybrid = " (hybrid host: containers whose runtime uses v1 only are not seen there)"
    unified = os.path.realpath(root) == "/sys/fs/cgroup"
    report.ok(
        f"cgroup v2 at {root}: owners' cgroup ids name their containers and pods"
        + ("" if unified else hybrid)
    )
    pods = os.path.join(DEFAULT_LOG_ROOT, "pods")
    if os.path.isdir(pods):
        report.ok(f"kubelet pod directories at {pods}: pods get namespace, name and container")


def _check_headers(report: Report, release: str, fix: bool) -> None:
    found = headers_dir(release)
    if found is not None:
        report.ok(f"kernel headers for BCC: {found}")
        return
    candidates = find_headers_candidates()
    if candidates and fix and os.geteuid() == 0:
        best = candidates[0]
        where = link_headers(release, best)
        report.echo(
            f"        fixed: no headers for {release}; linked {where}/build -> {best.build} and "
            f"{where}/source -> {best.source} (enough for this tracepoint-only program)"
        )
        report.ok(f"kernel headers for BCC: {where / 'build'} (from another kernel version)")
        return
    if candidates:
        report.fail(
            f"no kernel headers for {release} (BCC compiles the BPF program with them)",
            f"tcptrace-ebpf doctor --fix (links {candidates[0].build})",
        )
    else:
        report.fail(
            f"no kernel headers for {release} and none installed",
            f"apt-get install linux-headers-{release} || apt-get install linux-headers-amd64; "
            "then tcptrace-ebpf doctor --fix",
        )


def _check_load(report: Report) -> None:
    """Compile, load and attach the real program, then detach."""
    from ..errors import UserError
    from ..kernel.probe import Tracer, TracerOptions

    # Compiled, not taken from the cache: this checks the compiler works.
    tracer = Tracer(TracerOptions(emit_events=True, collect_metrics=True, use_cache=False))
    try:
        tracer.start()
    except UserError as err:
        report.fail(
            f"loading the BPF program failed: {err}", "see the checks above; --debug for details"
        )
    else:
        report.ok(
            f"BPF program compiled, loaded and attached to {len(tracer.attached)} tracepoints"
        )
        # What the verifier really took: a BTF-typed program it refused runs raw.
        features = tracer.features
        typed = set(features.btf_trace_ids) if features and features.has("tp_btf") else set()
        for tracepoint, kind in sorted(tracer.attach_kinds.items()):
            if tracepoint.split(":", 1)[1] in typed and kind != "btf":
                report.warn(
                    f"{tracepoint}: the BTF-typed program was refused by this kernel, "
                    f"attached {kind} instead (slower per event; --debug shows why)"
                )
    finally:
        tracer.close()
