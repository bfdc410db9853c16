"""Socket holders and process details from /proc, with real child processes.

Every child is a ``python -c`` that blocks reading its stdin; the ``children``
fixture closes that pipe (the child exits) and kills any child still alive
after a few seconds, even when a test fails. Sockets are loopback listeners
on ephemeral ports, closed at teardown.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tcptrace_ebpf.errors import UserError
from tcptrace_ebpf.host import procfs
from tcptrace_ebpf.host.procfs import container_id_from_cgroup, parse_proc_cgroup
from tcptrace_ebpf.model.owners import ProcessInfo

# Child: optionally renames itself, reports "<inode>\n" of the socket it holds
# (its own listener, or the fd number given as argv[2]), then waits for EOF.
CHILD_CODE = """
import os, socket, sys
if sys.argv[1]:
    with open("/proc/self/comm", "w") as comm:
        comm.write(sys.argv[1])
if len(sys.argv) > 2:
    fd = int(sys.argv[2])
else:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    fd = sock.fileno()
print(os.fstat(fd).st_ino, flush=True)
sys.stdin.read()
"""


class Children:
    """Starts child processes and makes sure each one ends."""

    def __init__(self) -> None:
        self._processes: list[subprocess.Popen[str]] = []

    def start(
        self, *args: str, pass_fds: tuple[int, ...] = ()
    ) -> tuple[subprocess.Popen[str], int]:
        """(process, inode of the socket it holds)."""
        process = subprocess.Popen(
            [sys.executable, "-c", CHILD_CODE, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            pass_fds=pass_fds,
        )
        self._processes.append(process)
        assert process.stdout is not None
        inode = int(process.stdout.readline())
        return process, inode

    def end_all(self) -> None:
        for process in self._processes:
            if process.stdin is not None:
                process.stdin.close()
        for process in self._processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stdout is not None:
                process.stdout.close()


@pytest.fixture
def children() -> Iterator[Children]:
    started = Children()
    try:
        yield started
    finally:
        started.end_all()


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield sock
    finally:
        sock.close()


def test_child_holding_a_socket(children: Children) -> None:
    child, inode = children.start("")
    assert procfs.socket_holders([inode]) == {inode: [child.pid]}


def test_socket_inherited_across_fork_lists_both_processes(
    children: Children, listener: socket.socket
) -> None:
    fd = listener.fileno()
    child, inode = children.start("", str(fd), pass_fds=(fd,))
    assert inode == os.fstat(fd).st_ino
    assert procfs.socket_holders([inode]) == {inode: sorted([os.getpid(), child.pid])}


def test_holder_listed_once_per_process(listener: socket.socket) -> None:
    inode = os.fstat(listener.fileno()).st_ino
    duplicate = os.dup(listener.fileno())
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        # Two fds to the socket and a second thread sharing the fd table:
        # still one process.
        assert procfs.socket_holders([inode]) == {inode: [os.getpid()]}
    finally:
        stop.set()
        thread.join()
        os.close(duplicate)


def test_only_wanted_inodes_are_reported(children: Children, listener: socket.socket) -> None:
    _, child_inode = children.start("")
    own_inode = os.fstat(listener.fileno()).st_ino
    missing_inode = 2**40 + 7  # larger than any inode the kernel hands out

    assert procfs.socket_holders([own_inode, missing_inode]) == {own_inode: [os.getpid()]}
    assert procfs.socket_holders([]) == {}
    everything = procfs.socket_holders()
    assert everything[own_inode] == [os.getpid()]
    assert child_inode in everything


def test_process_info_of_a_child(children: Children) -> None:
    child, _ = children.start("tcptrace-child")
    info = procfs.process_info(child.pid)
    assert info is not None
    assert info.pid == child.pid
    assert info.comm == "tcptrace-child"
    assert info.cmdline == " ".join([sys.executable, "-c", CHILD_CODE, "tcptrace-child"])
    with open(f"/proc/{child.pid}/cgroup") as file:
        assert (info.cgroup, info.container_id) == parse_proc_cgroup(file.read())
    assert info.cgroup.startswith("/")


def test_vanished_process_gives_none() -> None:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()  # reaped: the pid is free
    assert procfs.process_info(process.pid) is None


def test_kernel_thread_has_empty_cmdline() -> None:
    info = procfs.process_info(2)  # kthreadd, in the initial pid namespace
    if info is None or info.comm != "kthreadd":
        pytest.skip("no kthreadd in this pid namespace")
    assert info.cmdline == ""


def fake_proc(root: Path, processes: dict[str, dict[str, str]]) -> str:
    """A directory shaped like /proc: ``{pid: {fd name: link target}}``."""
    for pid, fds in processes.items():
        fd_directory = root / pid / "fd"
        fd_directory.mkdir(parents=True)
        for name, target in fds.items():
            (fd_directory / name).symlink_to(target)
    return str(root)


def test_scan_of_a_proc_tree(tmp_path: Path) -> None:
    proc = fake_proc(
        tmp_path,
        {
            "123": {"0": "/dev/null", "3": "socket:[42]", "4": "socket:[43]", "5": "socket:[42]"},
            "789": {"7": "socket:[42]", "8": "pipe:[99]", "9": "anon_inode:[eventpoll]"},
            "55": {},  # a kernel thread
        },
    )
    (tmp_path / "456").mkdir()  # exited between listing and reading: no fd/
    (tmp_path / "self").symlink_to("123")
    (tmp_path / "sys").mkdir()

    assert procfs.socket_holders(proc=proc) == {42: [123, 789], 43: [123]}
    assert procfs.socket_holders([43, 44], proc=proc) == {43: [123]}


def test_missing_proc_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot list processes") as caught:
        procfs.socket_holders(proc=str(tmp_path / "absent"))
    assert "\n" not in str(caught.value)


def test_process_info_from_files(tmp_path: Path) -> None:
    process = tmp_path / "77"
    process.mkdir()
    (process / "comm").write_text("nginx\n")
    (process / "cmdline").write_bytes(b"nginx: worker process\0\0")
    (process / "cgroup").write_text(f"0::/system.slice/docker-{ID_A}.scope\n")
    thread = tmp_path / "78"
    thread.mkdir()
    (thread / "comm").write_text("kworker/0:1\n")
    (thread / "cmdline").write_bytes(b"")
    (thread / "cgroup").write_text("0::/\n")
    multi_arg = tmp_path / "79"
    multi_arg.mkdir()
    (multi_arg / "comm").write_text("python3\n")
    (multi_arg / "cmdline").write_bytes(b"/usr/bin/python3\0-m\0http.server\0\xff8080\0")
    (multi_arg / "cgroup").write_text("0::/user.slice/user-0.slice/session-1.scope\n")

    assert procfs.process_info(77, proc=str(tmp_path)) == ProcessInfo(
        pid=77,
        comm="nginx",
        cmdline="nginx: worker process",
        cgroup=f"/system.slice/docker-{ID_A}.scope",
        container_id=ID_A,
    )
    assert procfs.process_info(78, proc=str(tmp_path)) == ProcessInfo(
        pid=78, comm="kworker/0:1", cmdline="", cgroup="/", container_id=None
    )
    info = procfs.process_info(79, proc=str(tmp_path))
    assert info is not None
    assert info.cmdline == "/usr/bin/python3 -m http.server \ufffd8080"
    assert procfs.process_info(80, proc=str(tmp_path)) is None


ID_A = "0123456789abcdef" * 4
ID_B = "fedcba9876543210" * 4
POD = "pod0e7c4b6d_7f8a_4a3c_9f5e_1b2c3d4e5f60"


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        # docker, systemd cgroup driver and cgroupfs driver
        (f"/system.slice/docker-{ID_A}.scope", ID_A),
        (f"/docker/{ID_A}", ID_A),
        # kubernetes with containerd, systemd and cgroupfs drivers
        (
            "/kubepods.slice/kubepods-burstable.slice/"
            f"kubepods-burstable-{POD}.slice/cri-containerd-{ID_A}.scope",
            ID_A,
        ),
        (f"/kubepods/burstable/pod0e7c4b6d-7f8a-4a3c-9f5e-1b2c3d4e5f60/{ID_A}", ID_A),
        (f"/kubepods/besteffort/{POD}/{ID_A}", ID_A),
        # cri-o, and its conmon monitor, which runs outside the container
        (
            f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-{POD}.slice/"
            f"crio-{ID_A}.scope",
            ID_A,
        ),
        (f"/kubepods.slice/kubepods-besteffort-{POD}.slice/crio-conmon-{ID_A}.scope", None),
        # podman: rootful, rootless, with a sub-cgroup, cgroupfs driver, conmon
        (f"/machine.slice/libpod-{ID_A}.scope", ID_A),
        (f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID_A}.scope", ID_A),
        (f"/machine.slice/libpod-{ID_A}.scope/container", ID_A),
        (f"/libpod_parent/libpod-{ID_A}", ID_A),
        (f"/machine.slice/libpod-conmon-{ID_A}.scope", None),
        # nested containers: the innermost one
        (f"/docker/{ID_A}/docker/{ID_B}", ID_B),
        (f"/docker/{ID_A}/kubepods/besteffort/{POD}/{ID_B}", ID_B),
        # host processes
        ("/", None),
        ("", None),
        ("/init.scope", None),
        ("/system.slice/sshd.service", None),
        ("/user.slice/user-0.slice/session-3.scope", None),
        (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-{POD}.slice", None),
        ("/process_api/bd4a5b192f98a1ad010692d9207b9977", None),  # 32 hex digits
        (f"/docker/{ID_A[:12]}", None),  # short ids never appear in cgroup paths
        (f"/docker/{ID_A.upper()}", None),
        (f"/system.slice/docker-{ID_A}.scope.old", None),
        (f"/system.slice/mydocker-{ID_A}.scope", None),
    ],
)
def test_container_id_from_cgroup(path: str, expected: str | None) -> None:
    assert container_id_from_cgroup(path) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # cgroup v2
        (f"0::/system.slice/docker-{ID_A}.scope\n", (f"/system.slice/docker-{ID_A}.scope", ID_A)),
        (
            "0::/user.slice/user-0.slice/session-1.scope\n",
            ("/user.slice/user-0.slice/session-1.scope", None),
        ),
        # cgroup v1, docker with the cgroupfs driver
        (
            f"12:memory:/docker/{ID_A}\n11:cpu,cpuacct:/docker/{ID_A}\n1:name=systemd:/docker/{ID_A}\n",
            (f"/docker/{ID_A}", ID_A),
        ),
        # hybrid: the unified hierarchy is unused, the container is in v1 only
        (
            f"9:name=systemd:/\n4:memory:/docker/{ID_A}\n0::/\n",
            (f"/docker/{ID_A}", ID_A),
        ),
        # hybrid host process (this is what a process here looks like)
        (
            "9:name=systemd:/\n4:memory:/process_api/bd4a5b192f98a1ad010692d9207b9977\n1:cpu:/\n0::/\n",
            ("/process_api/bd4a5b192f98a1ad010692d9207b9977", None),
        ),
        ("0::/\n", ("/", None)),
        ("", ("", None)),
    ],
)
def test_parse_proc_cgroup(text: str, expected: tuple[str, str | None]) -> None:
    assert parse_proc_cgroup(text) == expected
