"""Pods, for real: leaking processes in cgroups with the kubelet's path shapes,
each in a network namespace of its own; the metrics, `closewait` and the
lifecycles name the right pod and container."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support import cli_argv, close_pipes, free_port, requires_root, run_cli, sh, wait_for
from test_closewait import LEAKER
from test_serve import Samples, scrape

from tcptrace_ebpf.host.workloads import find_cgroup2_root

CGROUP2 = find_cgroup2_root()

pytestmark = [
    requires_root,
    pytest.mark.skipif(CGROUP2 is None, reason="no cgroup v2 hierarchy mounted"),
]


@dataclass
class Pod:
    namespace: str
    name: str
    uid: str
    container: str
    container_id: str
    cgroup: Path
    netns: str


@contextlib.contextmanager
def cgroup_dirs(parts: list[str]) -> Iterator[Path]:
    """Make the cgroup v2 directories `parts` (those missing); on exit kill
    what is left in the ones made and remove them, deepest first."""
    assert CGROUP2 is not None
    path = Path(CGROUP2)
    made: list[Path] = []
    try:
        for part in parts:
            path = path / part
            if not path.exists():
                path.mkdir()
                made.append(path)
        yield path
    finally:
        for directory in reversed(made):
            for _ in range(100):
                pids = (directory / "cgroup.procs").read_text().split()
                for pid in pids:  # only test processes can be in our cgroups
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
                try:
                    directory.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)


@contextlib.contextmanager
def pod(log_root: Path, namespace: str, *, driver: str, runtime: str) -> Iterator[Pod]:
    """A pod's cgroup (kubelet layout of `driver`, `runtime`'s naming), its
    kubelet log directories and a network namespace."""
    uid = str(uuid.uuid4())
    cid = secrets.token_hex(32)
    name = f"cart-{secrets.token_hex(3)}"
    if driver == "systemd":
        scope = {"containerd": "cri-containerd", "cri-o": "crio"}[runtime]
        parts = [
            "kubepods.slice",
            "kubepods-burstable.slice",
            f"kubepods-burstable-pod{uid.replace('-', '_')}.slice",
            f"{scope}-{cid}.scope",
        ]
    else:
        leaf = cid if runtime == "containerd" else f"crio-{cid}"
        parts = ["kubepods", "besteffort", f"pod{uid}", leaf]
    pod_logs = log_root / "pods" / f"{namespace}_{name}_{uid}"
    (pod_logs / "api").mkdir(parents=True)
    (pod_logs / "sidecar").mkdir()
    (log_root / "containers").mkdir(exist_ok=True)
    (log_root / "containers" / f"{name}_{namespace}_api-{cid}.log").touch()
    netns = f"ttk{uuid.uuid4().hex[:6]}"
    with cgroup_dirs(parts) as cgroup:
        sh("ip", "netns", "add", netns)
        try:
            sh("ip", "-n", netns, "link", "set", "lo", "up")
            yield Pod(namespace, name, uid, "api", cid, cgroup, netns)
        finally:
            sh("ip", "netns", "del", netns, check=False)


class PodLeaker:
    """The leaker of test_closewait, started inside a pod's cgroup and network
    namespace, with `count` clients in that namespace that connect and close."""

    def __init__(self, where: Pod, port: int, count: int, script: Path) -> None:
        script.write_text(LEAKER)
        # The shell moves itself into the cgroup, then becomes the leaker.
        self.proc = subprocess.Popen(
            [
                "sh", "-c",
                f'echo $$ > {where.cgroup}/cgroup.procs && exec ip netns exec {where.netns} '
                f'{sys.executable} {script} {port} {count} plain',
            ],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.pid = self.proc.pid
        wait_for(
            lambda: (
                sh(
                    "ip", "netns", "exec", where.netns, "ss", "-tlnH", f"sport = :{port}"
                ).stdout.strip()
                != ""
            ),
            timeout=30,
        )
        client = (
            "import socket, sys\n"
            f"held = [socket.create_connection(('127.0.0.1', {port})) for _ in range({count})]\n"
            "[sock.close() for sock in held]\n"
        )
        sh("ip", "netns", "exec", where.netns, sys.executable, "-c", client)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "accepted"

    def close_sockets(self) -> None:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "closed"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        close_pipes(self.proc)


@contextlib.contextmanager
def leaking(where: Pod, port: int, count: int, tmp_path: Path) -> Iterator[PodLeaker]:
    leak: PodLeaker | None = None
    try:
        leak = PodLeaker(where, port, count, tmp_path / f"leaker-{port}.py")
        yield leak
    finally:
        if leak is not None:
            leak.stop()


def close_wait_of(samples: Samples, name: str, where: Pod) -> float:
    """A gauge's value for the pod's container, whatever the program's name."""
    return sum(
        value
        for (metric, labels), value in samples.items()
        if metric == name
        and ("namespace", where.namespace) in labels
        and ("pod", where.name) in labels
        and ("container", where.container) in labels
    )


def closewait_json(api: str, *args: str) -> list[dict[str, Any]]:
    result = subprocess.run(
        cli_argv("closewait", "--json", "--api.socket", api, "--min-age", "0", *args),
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def test_pods_leaking_close_wait_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    logs = tmp_path / "log"
    # The kubelet's log directories, as the DaemonSet mounts them (read by serve and closewait).
    monkeypatch.setenv("TCPTRACE_KUBELET_LOG_DIR", str(logs))
    n_old, n_new = 3, 5
    port_old, port_new = free_port(), free_port()
    api = str(tmp_path / "api.sock")
    http = free_port()
    with (
        pod(logs, "shop", driver="systemd", runtime="containerd") as old_pod,
        pod(logs, "billing", driver="cgroupfs", runtime="cri-o") as new_pod,
        # Leaking before the exporter starts, in another network namespace.
        leaking(old_pod, port_old, n_old, tmp_path) as old_leak,
    ):
        with (
            run_cli(
                "serve", "--web.listen-address", f"127.0.0.1:{http}", "--api.socket", api,
                "--port", str(port_old), "--port", str(port_new),
            ),
            run_cli(
                "lifecycles", "--json", "--port", str(port_old), "--port", str(port_new)
            ) as lives,
            # Only the new pod's, by --pod (the old pod's sockets are on the same ports).
            run_cli(
                "lifecycles", "--json", "--port", str(port_old), "--port", str(port_new),
                "--pod", f"billing/{new_pod.name}",
            ) as new_pod_lives,
        ):  # fmt: skip
            wait_for(lambda: ("tcptrace_events_total", ()) in scrape(http), timeout=60)
            with leaking(new_pod, port_new, n_new, tmp_path) as new_leak:
                # The metrics: one series per pod and container.
                for where, n in ((old_pod, n_old), (new_pod, n_new)):
                    wait_for(
                        lambda where=where, n=n: (
                            close_wait_of(scrape(http), "tcptrace_close_wait_sockets", where) == n
                        ),
                        timeout=30,
                    )
                    assert (
                        close_wait_of(scrape(http), "tcptrace_close_wait_oldest_seconds", where) > 0
                    )
                # closewait: every namespace, each group named, and --pod / --container filter.
                groups = {g["pid"]: g for g in closewait_json(api)}
                for leak, where, n in ((old_leak, old_pod, n_old), (new_leak, new_pod, n_new)):
                    group = groups[leak.pid]
                    assert group["count"] == n
                    assert (group["namespace"], group["pod"], group["container"]) == (
                        where.namespace, where.name, where.container,
                    )  # fmt: skip
                    assert group["container_id"] == where.container_id
                old_only = closewait_json(api, "--pod", f"shop/{old_pod.name}")
                assert [g["pid"] for g in old_only] == [old_leak.pid]
                assert old_only[0]["oldest_age_is_lower_bound"] is True
                assert [g["pid"] for g in closewait_json(api, "--pod", new_pod.name)] == [
                    new_leak.pid
                ]
                assert closewait_json(api, "--container", "nosuch") == []
                # The lifecycles, once the leakers close: each server socket names its pod.
                # (The old pod's peers may be gone by then, tcp_fin_timeout
                # after their close: its sockets then end reset_received.)
                old_leak.close_sockets()
                new_leak.close_sockets()
                for where, port, n in ((old_pod, port_old, n_old), (new_pod, port_new, n_new)):
                    wait_for(
                        lambda port=port, n=n: (
                            len(
                                [
                                    life
                                    for life in lives.json_lines()
                                    if life["lport"] == port and life["role"] == "server"
                                ]
                            )
                            >= n
                        ),
                        timeout=30,
                        what=lambda port=port: (
                            f"lifecycles on port {port}: "
                            + str([life for life in lives.json_lines() if life["lport"] == port])
                            + str(lives.stderr)
                        ),
                    )
                    served = [
                        life
                        for life in lives.json_lines()
                        if life["lport"] == port and life["role"] == "server"
                    ]
                    for life in served:
                        assert (life["namespace"], life["pod"], life["container"]) == (
                            where.namespace, where.name, where.container,
                        )  # fmt: skip
                        assert life["cgroup_id"] == os.stat(where.cgroup).st_ino
                filtered = new_pod_lives.json_lines()
                wait_for(
                    lambda: (
                        len(
                            [
                                life
                                for life in new_pod_lives.json_lines()
                                if life["lport"] == port_new
                            ]
                        )
                        >= n_new
                    ),
                    timeout=30,
                )
                filtered = new_pod_lives.json_lines()
                assert {life["pod"] for life in filtered} == {new_pod.name}
                assert port_old not in {life["lport"] for life in filtered}
                # And the gauges drop back.
                for where in (old_pod, new_pod):
                    wait_for(
                        lambda where=where: (
                            close_wait_of(scrape(http), "tcptrace_close_wait_sockets", where) == 0
                        ),
                        timeout=30,
                    )


TIME_WAIT_MAKER = """
import socket, sys
count = int(sys.argv[1])
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(count)
for _ in range(count):
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    client.close()  # the client closes first: its side goes to TIME_WAIT
    accepted.recv(1)
    accepted.close()
"""


def test_time_wait_per_pod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`timewait` counts the TIME_WAIT each pod's connections left, in every namespace."""
    logs = tmp_path / "log"
    monkeypatch.setenv("TCPTRACE_KUBELET_LOG_DIR", str(logs))
    count = 7
    api = str(tmp_path / "api.sock")
    http = free_port()
    with (
        pod(logs, "shop", driver="systemd", runtime="cri-o") as where,
        run_cli("serve", "--web.listen-address", f"127.0.0.1:{http}", "--api.socket", api),
    ):
        script = tmp_path / "tw.py"
        script.write_text(TIME_WAIT_MAKER)
        sh(
            "sh", "-c",
            f"echo $$ > {where.cgroup}/cgroup.procs && exec ip netns exec {where.netns} "
            f"{sys.executable} {script} {count}",
        )  # fmt: skip

        def pod_time_wait() -> int:
            result = subprocess.run(
                cli_argv("timewait", "--json", "--api.socket", api),
                capture_output=True, text=True, timeout=60, check=True,
            )  # fmt: skip
            view = json.loads(result.stdout)
            return sum(
                item["time_wait"]
                for item in view["workloads"]
                if (item["namespace"], item["pod"], item["container"])
                == (where.namespace, where.name, where.container)
            )

        wait_for(lambda: pod_time_wait() == count, timeout=30)
        table = subprocess.run(
            cli_argv("timewait", "--api.socket", api),
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout  # fmt: skip
        assert f"shop/{where.name}/api" in table


CONTAINER_LEAKER = """
import socket, sys, time
count = int(sys.argv[1])
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(count)
clients = [socket.create_connection(server.getsockname()) for _ in range(count)]
held = [server.accept()[0] for _ in range(count)]
for client in clients:
    client.close()  # the peer closes; `held` never is: CLOSE_WAIT
print("leaking", flush=True)
time.sleep(3600)
"""

# What podman needs here: runc (crun refuses hybrid cgroup hosts), the
# cgroupfs manager (no systemd), and rlimits no higher than ours (raising
# them needs CAP_SYS_RESOURCE, which this machine's root lacks).
PODMAN_RUN = [
    "podman", "run", "--runtime", "runc", "--cgroup-manager", "cgroupfs",
    "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096",
]  # fmt: skip


def _podman_works() -> bool:
    import shutil

    return all(shutil.which(tool) for tool in ("podman", "runc", "busybox"))


@pytest.mark.skipif(not _podman_works(), reason="needs podman, runc and busybox-static")
def test_real_podman_container(tmp_path: Path) -> None:
    """A real container (podman, image imported from a local busybox root
    filesystem, the host's /usr mounted for Python), in its own network
    namespace, leaking CLOSE_WAIT before serve starts: found and named."""
    rootfs = tmp_path / "rootfs"
    for directory in ("bin", "usr", "tmp", "proc", "sys", "dev", "etc"):
        (rootfs / directory).mkdir(parents=True)
    sh("cp", sh("sh", "-c", "command -v busybox").stdout.strip(), str(rootfs / "bin" / "busybox"))
    (rootfs / "bin" / "sh").symlink_to("busybox")
    (rootfs / "lib").symlink_to("usr/lib")
    (rootfs / "lib64").symlink_to("usr/lib64")
    image = f"localhost/tcptrace-test:{uuid.uuid4().hex[:8]}"
    subprocess.run(
        f"tar -C {rootfs} -c . | podman import -q - {image}",
        shell=True, check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    (tmp_path / "leak.py").write_text(CONTAINER_LEAKER)
    count = 4
    container = ""
    # podman's cgroupfs manager makes this parent cgroup on first use and leaves it.
    assert CGROUP2 is not None
    podman_parent = Path(CGROUP2) / "libpod_parent"
    parent_existed = podman_parent.exists()
    try:
        container = sh(
            *PODMAN_RUN, "-d", "--network", "none", "-v", "/usr:/usr:ro",
            "-v", f"{tmp_path}:/work:ro", image, "/usr/bin/python3", "/work/leak.py", str(count),
        ).stdout.strip()  # fmt: skip
        wait_for(lambda: "leaking" in sh("podman", "logs", container).stdout, timeout=60)
        api = str(tmp_path / "api.sock")
        http = free_port()
        with run_cli("serve", "--web.listen-address", f"127.0.0.1:{http}", "--api.socket", api):
            short = container[:12]

            def container_gauge() -> float:
                return sum(
                    value
                    for (metric, labels), value in scrape(http).items()
                    if metric == "tcptrace_close_wait_sockets"
                    and ("container", short) in labels
                    and ("pod", "") in labels
                )

            wait_for(lambda: container_gauge() == count, timeout=30)
            groups = [g for g in closewait_json(api, "--container", short) if g["container_id"]]
            assert [(g["container_id"], g["count"]) for g in groups] == [(container, count)]
            assert groups[0]["oldest_age_is_lower_bound"] is True
            assert groups[0]["cgroup"].endswith(f"libpod-{container}")
    finally:
        if container:
            sh("podman", "rm", "-f", "-t", "0", container, check=False)
        sh("podman", "rmi", "-f", image, check=False)
        if not parent_existed:
            with contextlib.suppress(OSError):
                podman_parent.rmdir()
