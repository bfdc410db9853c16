"""cgroup paths and kubelet log directories to containers and pods (pure, no root)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tcptrace_ebpf.host.workloads import (
    CgroupPlace,
    Workloads,
    cgroup2_mounts,
    find_cgroup2_root,
    parse_cgroup_path,
    parse_container_log,
    parse_pod_log_dir,
)

CID = "0123456789abcdef" * 4
UID = "3f2a1b4c-5d6e-4f70-8192-a3b4c5d6e7f8"
SLICE_UID = UID.replace("-", "_")


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        # kubelet, systemd driver: burstable, besteffort, guaranteed pods
        (
            f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{SLICE_UID}.slice/"
            f"cri-containerd-{CID}.scope",
            CgroupPlace(CID, "containerd", UID),
        ),
        (
            f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{SLICE_UID}.slice/"
            f"crio-{CID}.scope",
            CgroupPlace(CID, "cri-o", UID),
        ),
        (
            f"/kubepods.slice/kubepods-pod{SLICE_UID}.slice/docker-{CID}.scope",
            CgroupPlace(CID, "docker", UID),
        ),
        # kubelet, cgroupfs driver
        (f"/kubepods/burstable/pod{UID}/{CID}", CgroupPlace(CID, "", UID)),
        (f"/kubepods/pod{UID}/crio-{CID}", CgroupPlace(CID, "cri-o", UID)),
        # a process in a sub-cgroup of its container, read from another cgroup namespace
        (f"/../../kubepods/besteffort/pod{UID}/{CID}/init", CgroupPlace(CID, "", UID)),
        # the pod's own cgroup
        (
            f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{SLICE_UID}.slice",
            CgroupPlace("", "", UID),
        ),
        # plain containers
        (f"/system.slice/docker-{CID}.scope", CgroupPlace(CID, "docker", "")),
        (f"/docker/{CID}", CgroupPlace(CID, "", "")),
        (f"/machine.slice/libpod-{CID}.scope/container", CgroupPlace(CID, "podman", "")),
        # not containers: the conmon monitor, the host, user sessions
        (f"/machine.slice/libpod-conmon-{CID}.scope", CgroupPlace()),
        ("/system.slice/nginx.service", CgroupPlace()),
        ("/", CgroupPlace()),
        ("", CgroupPlace()),
    ],
)
def test_parse_cgroup_path(path: str, expected: CgroupPlace) -> None:
    assert parse_cgroup_path(path) == expected


def test_kubelet_log_names() -> None:
    assert parse_container_log(f"web-7d9f_shop_nginx-{CID}.log") == (
        CID,
        "shop",
        "web-7d9f",
        "nginx",
    )
    assert parse_container_log("web_shop_nginx.log") is None
    assert parse_pod_log_dir(f"shop_web-7d9f_{UID}") == (UID, "shop", "web-7d9f")
    assert parse_pod_log_dir("not-a-pod") is None


def test_cgroup2_mounts_hybrid_and_unified() -> None:
    hybrid = (
        "30 25 0:26 / /sys/fs/cgroup/unified rw,nosuid shared:9 - cgroup2 cgroup2 rw\n"
        "31 25 0:27 / /sys/fs/cgroup/cpu rw shared:10 - cgroup cgroup rw,cpu\n"
    )
    assert cgroup2_mounts(hybrid) == ["/sys/fs/cgroup/unified"]
    inside = (
        "40 30 0:26 /kubepods/pod1 /sys/fs/cgroup ro - cgroup2 cgroup rw\n"
        "41 30 0:26 / /host/sys/fs/cgroup ro - cgroup2 cgroup rw\n"
    )
    assert cgroup2_mounts(inside) == ["/host/sys/fs/cgroup", "/sys/fs/cgroup"]
    assert cgroup2_mounts("31 25 0:27 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n") == []


def test_resolver_names_pods_from_kubelet_logs(tmp_path: Path) -> None:
    """ids -> paths by walking a tree (inode numbers), paths -> pods by the log directories."""
    tree = tmp_path / "cgroup"
    pod = tree / "kubepods" / "burstable" / f"pod{UID}"
    (pod / CID).mkdir(parents=True)
    other = "fedcba9876543210" * 4
    (pod / other).mkdir()
    logs = tmp_path / "log"
    (logs / "pods" / f"shop_cart-5b6c_{UID}" / "api").mkdir(parents=True)
    (logs / "pods" / f"shop_cart-5b6c_{UID}" / "sidecar").mkdir()
    (logs / "containers").mkdir()
    (logs / "containers" / f"cart-5b6c_shop_api-{CID}.log").touch()
    workloads = Workloads(cgroup_root=str(tree), log_root=str(logs))
    named = workloads.of_id(os.stat(pod / CID).st_ino)
    assert (named.namespace, named.pod, named.container) == ("shop", "cart-5b6c", "api")
    assert named.cgroup == f"/kubepods/burstable/pod{UID}/{CID}"
    # Two containers in the pod and no log link for this one: the pod, and the short id.
    unnamed = workloads.of_id(os.stat(pod / other).st_ino)
    assert (unnamed.namespace, unnamed.pod, unnamed.container) == ("shop", "cart-5b6c", other[:12])
    assert workloads.of_id(os.stat(tree).st_ino).cgroup == "/"
    assert workloads.of_id(123456789).cgroup == ""


def test_doctor_says_whether_cgroup_ids_resolve(monkeypatch: pytest.MonkeyPatch) -> None:
    from tcptrace_ebpf.commands.doctor import Report, _check_cgroups

    lines: list[str] = []
    monkeypatch.setenv("TCPTRACE_CGROUP2_ROOT", "/nonexistent/cgroup2")
    _check_cgroups(Report(lines.append))
    assert lines[0].startswith("  warn  no cgroup v2 hierarchy mounted (cgroup v1 only)")
    assert "fix: mount -t cgroup2" in lines[0]
    monkeypatch.delenv("TCPTRACE_CGROUP2_ROOT")
    if find_cgroup2_root() is None:
        pytest.skip("this host has no cgroup v2 hierarchy")
    lines.clear()
    _check_cgroups(Report(lines.append))
    assert lines[0].startswith(f"  ok    cgroup v2 at {find_cgroup2_root()}")


def test_pod_and_container_filters() -> None:
    from tcptrace_ebpf.model.owners import Workload

    api = Workload("/k/pod/x", CID, "containerd", "shop", "cart-5b6c", "api", UID)
    assert api.matches(None, None)
    assert api.matches("cart-5b6c", None)
    assert api.matches("shop/cart-5b6c", None)
    assert not api.matches("other/cart-5b6c", None)
    assert not api.matches("cart", None)
    assert api.matches(None, "api")
    assert api.matches("cart-5b6c", CID[:12])
    assert not api.matches(None, "sidecar")
    assert not api.matches(None, CID[:6])
    host = Workload(cgroup="/system.slice/nginx.service")
    assert host.matches(None, None)
    assert not host.matches("", None)
    assert not host.matches(None, "")


def test_a_container_named_later_is_named_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kubelet links a container's log after it starts: until then it goes
    by its short id, then by its name (not stuck with the first answer)."""
    import tcptrace_ebpf.host.workloads as workloads_module

    monkeypatch.setattr(workloads_module, "WALK_MIN_INTERVAL_S", 0.0)
    tree = tmp_path / "cgroup"
    leaf = tree / "kubepods" / f"pod{UID}" / CID
    leaf.mkdir(parents=True)
    logs = tmp_path / "log"
    (logs / "pods" / f"shop_cart-5b6c_{UID}" / "api").mkdir(parents=True)
    (logs / "pods" / f"shop_cart-5b6c_{UID}" / "sidecar").mkdir()
    (logs / "containers").mkdir()
    workloads = Workloads(cgroup_root=str(tree), log_root=str(logs))
    cgroup_id = os.stat(leaf).st_ino
    assert workloads.of_id(cgroup_id).container == CID[:12]
    (logs / "containers" / f"cart-5b6c_shop_api-{CID}.log").touch()
    assert workloads.of_id(cgroup_id).container == "api"
    assert workloads.of_path(f"/kubepods/pod{UID}/{CID}").container == "api"
