"""Who owns or holds a socket: a process, and the container and pod it runs in."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any


def workload_names_json(namespace: str, pod: str, container: str) -> dict[str, str | None]:
    """The keys every JSON output names an owner's container and pod with
    (null where not applicable)."""
    return {"namespace": namespace or None, "pod": pod or None, "container": container or None}


@dataclass(frozen=True, slots=True)
class Workload:
    """A socket owner's container and pod. Empty strings where not applicable."""

    cgroup: str = ""  # cgroup v2 path ("" when unknown)
    container_id: str = ""
    runtime: str = ""
    namespace: str = ""  # Kubernetes namespace
    pod: str = ""
    container: str = ""  # Kubernetes container name; else the short container id
    pod_uid: str = ""

    def to_json(self) -> dict[str, str | None]:
        return {
            "cgroup": self.cgroup or None,
            "container_id": self.container_id or None,
            **self.names_json(),
        }

    def names_json(self) -> dict[str, str | None]:
        return workload_names_json(self.namespace, self.pod, self.container)

    def matches(self, pod: str | None, container: str | None) -> bool:
        """The --pod (NAME or NAMESPACE/NAME) and --container (name or id) filters."""
        if pod is not None and (
            not self.pod or pod not in (self.pod, f"{self.namespace}/{self.pod}")
        ):
            return False
        if container is None:
            return True
        return bool(self.container) and (
            container == self.container
            or (len(container) >= 12 and self.container_id.startswith(container))
        )


NO_WORKLOAD = Workload()


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    pid: int
    comm: str
    """Command name (/proc/PID/comm, at most 15 characters)."""
    cmdline: str
    """Arguments joined with spaces; "" for kernel threads and zombies."""
    cgroup: str
    """cgroup path of the process (see parse_proc_cgroup); "" if unreadable."""
    container_id: str | None
    """Full 64-hex id of the container the process runs in, None on the host."""
    # Its Kubernetes namespace, pod and container name ("" elsewhere; the
    # container is the short container id outside Kubernetes): see with_workload.
    namespace: str = ""
    pod: str = ""
    container: str = ""

    def with_workload(self, workload: Workload) -> ProcessInfo:
        """The same process, with the container and pod its cgroup names."""
        return replace(
            self, namespace=workload.namespace, pod=workload.pod, container=workload.container
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "comm": self.comm,
            "cmdline": self.cmdline,
            "cgroup": self.cgroup,
            "container_id": self.container_id,
            **self.names_json(),
        }

    def names_json(self) -> dict[str, str | None]:
        return workload_names_json(self.namespace, self.pod, self.container)

    def matches(self, pod: str | None, container: str | None) -> bool:
        """closewait's --pod (NAME or NAMESPACE/NAME) and --container (name or
        full id) filters."""
        if pod is not None and pod not in (self.pod, f"{self.namespace}/{self.pod}"):
            return False
        return container is None or container in (self.container, self.container_id)


@dataclass(frozen=True, slots=True)
class ListenerSeed:
    """The owner of the listeners of one port that predate the tracer: the
    kernel program gives it to the children they accept."""

    netns: int
    port: int
    pid: int  # 0 when not exactly one process holds the listeners of this port
    comm: str
    count: int  # listening sockets on this port
    ambiguous: bool
    cgroup_id: int = 0  # the owner's cgroup v2 id, for its children's container and pod
