"""What older kernels get: the kernel table, doctor's kernel line, and the
one-line refusal on a kernel the tracer cannot run on.

Kernels before 6.1 cannot be booted here, so their cases are built from what
detect_features() would find on them (the README's "Kernels" table says
which upstream release brought each feature); the running kernel is checked
for real, and a kernel without a feature is imitated by hiding its symbol
from /proc/kallsyms in a private mount namespace.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from support import Peer, cli_argv, deadline, free_port, requires_root

from tcptrace_ebpf.commands.doctor import Report, check_kernel
from tcptrace_ebpf.errors import UserError
from tcptrace_ebpf.kernel.features import (
    KERNEL_FEATURES,
    OLDEST_SUPPORTED,
    REQUIRED,
    Capability,
    Features,
    detect_features,
    kallsyms,
    kernel_summary,
    release_series,
    unsupported_reason,
)
from tcptrace_ebpf.kernel.probe import Tracer, TracerOptions, build_source

# include/uapi/linux/bpf.h: the map type of a perf buffer.
BPF_MAP_TYPE_PERF_EVENT_ARRAY = 4

# Capabilities a series lacks, from the sources (README, "Kernels"), for the
# distribution kernels people run, with BTF enabled (CONFIG_DEBUG_INFO_BTF).
LACKS = {
    "6.18.3-1-amd64": set(),
    "6.12.117+deb12-cloud-amd64": set(),
    "6.1.0-57-cloud-amd64": {"kfree_rx_sk"},
    "5.15.0-130-generic": {"kfree_rx_sk"},
    "5.10.0-33-amd64": {"kfree_rx_sk"},
    "5.4.0-200-generic": {"kfree_rx_sk", "sweepers", "tp_btf", "ringbuf"},
}


def kernel_like(release: str, lacking: set[str], detail: str = "") -> Features:
    """Features as detect_features() would report them on such a kernel."""
    features = Features(release=release)
    for name in {feature.capability for feature in KERNEL_FEATURES} | {"timewait", "netns"}:
        missing = name in lacking
        features.note(name, not missing, f"{detail or 'no'} {name}" if missing else name)
    return features


def lines_of(features: Features) -> tuple[list[str], bool]:
    lines: list[str] = []
    report = Report(lines.append)
    check_kernel(report, features)
    return "\n".join(lines).splitlines(), report.failed


def test_release_series() -> None:
    assert release_series("6.1.0-57-cloud-amd64") == (6, 1)
    assert release_series("6.12.117+deb12-cloud-amd64") == (6, 12)
    assert release_series("4.18.0-553.el8_10.x86_64") == (4, 18)
    assert release_series("weird") is None


def test_kallsyms_present_by_name_even_with_hidden_addresses(tmp_path: Path) -> None:
    """Without CAP_SYSLOG the addresses read 0; the names are what counts."""
    listing = tmp_path / "kallsyms"
    listing.write_text(
        "0000000000000000 T bpf_ringbuf_output\n"
        "0000000000000000 t __pfx_bpf_prog_test_run_raw_tp\n"
        "0000000000000000 T bpf_prog_test_run_raw_tpx [module]\n"
    )
    wanted = ("bpf_ringbuf_output", "bpf_prog_test_run_raw_tp")
    assert kallsyms(wanted, str(listing)) == {"bpf_ringbuf_output": 0}
    assert kallsyms(wanted, str(tmp_path / "absent")) == {}


def test_kallsyms_gives_addresses_in_one_pass(tmp_path: Path) -> None:
    """The first of duplicate names wins (a module may reuse a static name)."""
    listing = tmp_path / "kallsyms"
    listing.write_text(
        "ffffffff81a2b3c0 t tw_timer_handler\n"
        "ffffffff81000000 T bpf_skc_to_tcp_sock\n"
        "ffffffffc0001000 t tw_timer_handler\t[some_module]\n"
    )
    found = kallsyms(("tw_timer_handler", "bpf_skc_to_tcp_sock", "absent"), str(listing))
    assert found == {
        "tw_timer_handler": 0xFFFFFFFF81A2B3C0,
        "bpf_skc_to_tcp_sock": 0xFFFFFFFF81000000,
    }


def test_oldest_supported_is_the_newest_required_feature() -> None:
    # BPF_PROG_TEST_RUN on raw tracepoint programs: Linux 5.10.
    assert OLDEST_SUPPORTED == (5, 10)
    assert set(REQUIRED) == {"set_state", "sweepers"}


@pytest.mark.parametrize("release", ["6.18.3-1-amd64", "6.12.117+deb12-cloud-amd64"])
def test_a_kernel_with_everything(release: str) -> None:
    lines, failed = lines_of(kernel_like(release, LACKS[release]))
    assert not failed
    series = ".".join(map(str, release_series(release) or ()))
    assert lines == [f"  ok    kernel {release} (series {series}): has every kernel feature the "
                     "tracer uses"]  # fmt: skip


@pytest.mark.parametrize(
    "release", ["6.1.0-57-cloud-amd64", "5.15.0-130-generic", "5.10.0-33-amd64"]
)
def test_a_degraded_kernel_says_what_it_lacks(release: str) -> None:
    lines, failed = lines_of(kernel_like(release, LACKS[release]))
    assert not failed
    assert len(lines) == 1
    assert lines[0].startswith(f"  warn  kernel {release} (series ")
    assert "degraded, lacks skb:kfree_skb rx_sk (6.11+)" in lines[0]
    assert "BPF ring buffer" not in lines[0]


def test_a_kernel_older_than_the_oldest_supported_is_refused_in_one_line() -> None:
    release = "5.4.0-200-generic"
    features = kernel_like(release, LACKS[release], detail="no BPF_PROG_TEST_RUN for")
    reason = unsupported_reason(features)
    assert reason is not None
    assert reason.startswith(
        f"kernel {release} is older than the oldest supported, Linux 5.10, and cannot be traced: "
    )
    assert "no BPF_PROG_TEST_RUN for sweepers" in reason
    assert "\n" not in reason
    lines, failed = lines_of(features)
    assert failed
    assert lines[0] == f"  FAIL  {reason}"
    assert lines[1].startswith("        fix: Linux 5.10 or later")
    # What it would lack besides, for the README's table.
    summary = kernel_summary(features)
    for what in ("BPF ring buffer (5.8+)", "BTF-typed tracepoints", "kfree_skb rx_sk (6.11+)"):
        assert what in summary, summary


def test_a_recent_kernel_missing_a_required_feature_is_not_called_old() -> None:
    """tracefs not mounted on 6.18: cannot be traced, but not "older"."""
    features = kernel_like("6.18.3-1-amd64", {"set_state"}, detail="tracefs is not mounted:")
    reason = unsupported_reason(features)
    assert reason == "kernel 6.18.3-1-amd64 cannot be traced: tracefs is not mounted: set_state"


def test_a_backported_old_kernel_is_judged_by_its_features() -> None:
    """RHEL 8's 4.18 carries backports: what it has counts, not its number."""
    features = kernel_like("4.18.0-553.el8_10.x86_64", {"kfree_rx_sk"})
    assert unsupported_reason(features) is None
    lines, failed = lines_of(features)
    assert not failed
    assert "degraded" in lines[0]


@requires_root
def test_the_running_kernel_against_the_table() -> None:
    """doctor's kernel line on this machine agrees with the detection."""
    features = detect_features()
    lines, failed = lines_of(features)
    release = os.uname().release
    assert f"kernel {release} (series " in lines[0]
    lacking = [f for f in KERNEL_FEATURES if not features.has(f.capability)]
    assert failed == (unsupported_reason(features) is not None)
    if not lacking:
        assert lines[0].startswith("  ok    ")
        assert "has every kernel feature" in lines[0]
    for feature in lacking:
        assert feature.what in lines[0], lines[0]


def _without(*names: str) -> Features:
    features = detect_features()
    for name in names:
        features.capabilities[name] = Capability(name, False, f"taken away by the test: {name}")
    return features


@requires_root
def test_no_ring_buffer_means_a_perf_buffer() -> None:
    """Before 5.8 the event buffer is a perf buffer: chosen, not failed on."""
    text, _ = build_source(_without("ringbuf"), TracerOptions(emit_events=True))
    assert "#define USE_RINGBUF 0" in text
    text, _ = build_source(detect_features(), TracerOptions(emit_events=True))
    assert "#define USE_RINGBUF 1" in text  # this machine has one


@requires_root
def test_without_test_runs_the_program_is_not_built() -> None:
    with pytest.raises(UserError, match="cannot be traced: taken away by the test: sweepers"):
        build_source(_without("sweepers"), TracerOptions())


@requires_root
def test_events_arrive_through_the_perf_buffer() -> None:
    """The real program, loaded as on a kernel without the ring buffer, reports
    a connection's state changes."""
    port = free_port()
    raw_events: list[bytes] = []
    tracer = Tracer(
        TracerOptions(emit_events=True, ports=frozenset({port})),
        _without("ringbuf"),
        on_event=raw_events.append,
    )
    tracer.start()
    try:
        assert tracer.table("events").info.map_type == BPF_MAP_TYPE_PERF_EVENT_ARRAY
        with Peer() as server, Peer() as client:
            server.cmd(f"listen 127.0.0.1 {port}")
            client.cmd(f"connect 127.0.0.1 {port}")
            server.cmd("accept")
            client.cmd("close")
            server.cmd("close")
            server.cmd("close_listener")
        # Client: CLOSE>SYN_SENT, >ESTABLISHED, >FIN_WAIT1, >FIN_WAIT2, >CLOSE; the
        # child and the listener add more. Generous: the machine may be loaded.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(raw_events) < 10:
            tracer.poll(100)
    finally:
        tracer.close()
    assert len(raw_events) >= 10


@contextmanager
def _kallsyms_without(*symbols: str) -> Iterator[str]:
    """A copy of /proc/kallsyms without `symbols`, to bind-mount over it in a
    private mount namespace (the host keeps its own)."""
    with tempfile.TemporaryDirectory() as directory:
        copy = Path(directory) / "kallsyms"
        with open("/proc/kallsyms") as real, open(copy, "w") as out:
            for line in real:
                parts = line.split()
                if len(parts) < 3 or parts[2] not in symbols:
                    out.write(line)
        yield str(copy)


def _run_hidden(kallsyms: str, *args: str) -> subprocess.CompletedProcess[str]:
    command = " ".join(cli_argv(*args))
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f"mount --bind {kallsyms} /proc/kallsyms && exec {command}"],
        check=False, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@requires_root
def test_a_kernel_without_test_runs_is_refused_at_start_and_by_doctor() -> None:
    with _kallsyms_without("bpf_prog_test_run_raw_tp") as kallsyms:
        traced = _run_hidden(kallsyms, "trace", "--duration", "5")
        doctor = _run_hidden(kallsyms, "doctor")
    assert traced.returncode != 0
    lines = traced.stderr.strip().splitlines()
    assert len(lines) == 1, traced.stderr
    assert lines[0].startswith("tcptrace-ebpf: error: kernel "), lines[0]
    assert "cannot be traced: no BPF_PROG_TEST_RUN on raw tracepoint programs" in lines[0]
    assert "Traceback" not in traced.stderr
    assert doctor.returncode != 0
    fail = [line for line in doctor.stdout.splitlines() if line.startswith("  FAIL")]
    assert len(fail) == 1, doctor.stdout
    assert "cannot be traced: no BPF_PROG_TEST_RUN" in fail[0]
    assert "BPF program compiled" not in doctor.stdout  # not tried on such a kernel


@requires_root
def test_doctor_loads_the_largest_program_on_this_kernel() -> None:
    """doctor compiles and loads the program with events and metrics both
    on, the largest the verifier is given: on 6.18 three quarters of its
    million-instruction budget, so a change that grows it fails here first
    (README, "The verifier's budget"). On every kernel of the matrix it
    loads BTF-typed, nothing refused."""
    result = subprocess.run(
        cli_argv("doctor"), check=False, capture_output=True, text=True, timeout=deadline(120)
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok    BPF program compiled, loaded and attached to " in result.stdout, result.stdout
    assert "was refused by this kernel" not in result.stdout, result.stdout
    assert "ok    BTF-typed raw tracepoints" in result.stdout, result.stdout
