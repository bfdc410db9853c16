"""The deployment files in deploy/: systemd unit, DaemonSet, scrape config, Grafana provisioning.

Needs systemd-analyze (Debian package ``systemd``; it works without systemd
running) and promtool (Debian package ``prometheus``).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_dashboards import DASHBOARD_FILES, require_tool

from tcptrace_ebpf.web.config import parse_listen_address

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "systemd" / "tcptrace-ebpf.service"
DAEMONSET = DEPLOY / "kubernetes" / "daemonset.yaml"
SCRAPE_CONFIG = DEPLOY / "prometheus" / "scrape-config.yml"
ALERT_RULES = DEPLOY / "prometheus" / "tcptrace-alerts.yml"
GRAFANA = DEPLOY / "grafana" / "provisioning"

INSTALLED_BINARY = "/usr/local/bin/tcptrace-ebpf"
DEFAULT_PORT = 10072

# What the daemon needs, and why, is explained in the unit's comments. The
# DaemonSet must grant the same set.
CAPABILITIES = {
    "CAP_BPF",
    "CAP_PERFMON",
    "CAP_SYS_ADMIN",
    "CAP_SYSLOG",
    "CAP_SYS_PTRACE",
    "CAP_DAC_READ_SEARCH",
}

# ---------------------------------------------------------------------------
# systemd unit
# ---------------------------------------------------------------------------


def _unit_settings(text: str) -> dict[str, dict[str, list[str]]]:
    """{section: {key: [values, in order]}}; systemd allows repeated keys."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, raw
        assert not line.endswith("\\"), "continuation lines are not expected"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _service() -> dict[str, list[str]]:
    return _unit_settings(UNIT.read_text(encoding="utf-8"))["Service"]


def _verifiable_unit(tmp_path: Path) -> Path:
    """A copy of the unit whose ExecStart binary exists.

    systemd-analyze verify fails when the ExecStart binary is missing, and
    tcptrace-ebpf is not installed in /usr/local/bin on a test machine: the
    copy points ExecStart at an executable stub in tmp_path instead. Nothing
    else changes.
    """
    stub = tmp_path / "tcptrace-ebpf"
    stub.write_text("#!/bin/sh\nexit 0\n", encoding="utf-8")
    stub.chmod(0o755)
    text = UNIT.read_text(encoding="utf-8")
    assert f"ExecStart={INSTALLED_BINARY} " in text
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace(INSTALLED_BINARY, str(stub)), encoding="utf-8")
    return unit


def _systemd_analyze_verify(unit: Path) -> subprocess.CompletedProcess[str]:
    systemd_analyze = require_tool("systemd-analyze", "systemd")
    # --man=no: the unit has no Documentation= man pages to look for.
    return subprocess.run(
        [systemd_analyze, "verify", "--man=no", str(unit)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    unit = _verifiable_unit(tmp_path)
    result = _systemd_analyze_verify(unit)
    # verify exits 0 on unknown or misspelled settings and only warns, so
    # any output at all is a failure.
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""


def test_systemd_analyze_verify_catches_mistakes(tmp_path: Path) -> None:
    """The check above is not vacuous: a misspelled setting makes output."""
    unit = _verifiable_unit(tmp_path)
    unit.write_text(
        unit.read_text(encoding="utf-8").replace("ProtectHome=yes", "ProtectHomes=yes"),
        encoding="utf-8",
    )
    result = _systemd_analyze_verify(unit)
    assert "ProtectHomes" in result.stdout + result.stderr


def test_systemd_exposure_level(tmp_path: Path) -> None:
    """systemd's own review of the sandbox rates it OK (exposure below 5 of 10)."""
    systemd_analyze = require_tool("systemd-analyze", "systemd")
    unit = _verifiable_unit(tmp_path)
    result = subprocess.run(
        [systemd_analyze, "security", "--offline=true", "--no-pager", str(unit)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "SYSTEMD_COLORS": "0"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
    assert match, result.stdout
    assert float(match[1]) < 5.0, result.stdout


def test_systemd_unit_runs_serve_on_the_default_port() -> None:
    (exec_start,) = _service()["ExecStart"]
    argv = exec_start.split()
    assert argv[:2] == [INSTALLED_BINARY, "serve"]
    (listen,) = [a.split("=", 1)[1] for a in argv if a.startswith("--web.listen-address=")]
    assert parse_listen_address(listen)[1] == DEFAULT_PORT


def test_systemd_unit_capabilities() -> None:
    service = _service()
    kept = {cap for line in service["CapabilityBoundingSet"] for cap in line.split()}
    assert kept == CAPABILITIES
    assert "AmbientCapabilities" not in service  # runs as root; nothing to pass on
    assert "User" not in service  # the daemon refuses to run as another user
    # The memlock limit replaces CAP_SYS_RESOURCE on kernels before 5.11.
    assert service["LimitMEMLOCK"] == ["infinity"]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("NoNewPrivileges", "yes"),
        ("SystemCallArchitectures", "native"),
        ("LockPersonality", "yes"),
        ("RestrictNamespaces", "yes"),
        ("RestrictSUIDSGID", "yes"),
        ("ProtectControlGroups", "yes"),
        ("ProtectKernelLogs", "yes"),
        ("RuntimeDirectory", "tcptrace-ebpf"),
        ("RuntimeDirectoryMode", "0700"),
        ("CacheDirectory", "tcptrace-ebpf"),
        ("CacheDirectoryMode", "0700"),
        ("Restart", "on-failure"),
    ],
)
def test_systemd_unit_hardening(key: str, value: str) -> None:
    assert _service().get(key) == [value]


def test_systemd_unit_address_families_and_syscalls() -> None:
    service = _service()
    (families,) = service["RestrictAddressFamilies"]
    assert set(families.split()) == {"AF_INET", "AF_INET6", "AF_NETLINK", "AF_UNIX"}
    (syscall_filter,) = service["SystemCallFilter"]
    assert syscall_filter.startswith("~")
    denied = set(syscall_filter[1:].split())
    assert {"@mount", "@module", "@reboot", "@swap", "@raw-io", "@clock"} <= denied
    # bpf() is in @privileged and perf_event_open() in @debug.
    assert not denied & {"@privileged", "@debug", "@system-service"}


def test_systemd_unit_leaves_out_what_breaks_the_tracer() -> None:
    # Each one is explained in the unit: MDWE breaks BCC's in-process LLVM
    # JIT, ProtectKernelTunables hides /proc/kallsyms, ProtectKernelModules
    # hides the kernel headers, ProtectProc/ProcSubset hide processes and
    # kallsyms, PrivateNetwork/PrivateUsers hide the host's sockets and
    # capabilities.
    service = _service()
    comments = [line for line in UNIT.read_text(encoding="utf-8").splitlines() if line[:1] == "#"]
    for key in (
        "MemoryDenyWriteExecute",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectProc",
        "ProcSubset",
        "PrivateNetwork",
        "PrivateUsers",
    ):
        assert key not in service, key
        assert any(f"{key}=" in line for line in comments), f"{key}: reason missing"


# ---------------------------------------------------------------------------
# Kubernetes DaemonSet
# ---------------------------------------------------------------------------


def _daemonset() -> dict[str, Any]:
    (document,) = list(yaml.safe_load_all(DAEMONSET.read_text(encoding="utf-8")))
    assert document["apiVersion"] == "apps/v1"
    assert document["kind"] == "DaemonSet"
    return dict(document)


def _pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = _daemonset()["spec"]["template"]["spec"]
    return spec


def _container() -> dict[str, Any]:
    (container,) = _pod_spec()["containers"]
    return dict(container)


def test_daemonset_selector_matches_pods() -> None:
    daemonset = _daemonset()
    selector = daemonset["spec"]["selector"]["matchLabels"]
    labels = daemonset["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()


def test_daemonset_host_namespaces() -> None:
    spec = _pod_spec()
    assert spec["hostNetwork"] is True  # the node's sockets, the port on the node
    assert spec["hostPID"] is True  # socket owners resolve to the node's processes
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec["automountServiceAccountToken"] is False


def test_daemonset_security_context() -> None:
    context = _container()["securityContext"]
    assert context["privileged"] is False
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert context["runAsUser"] == 0
    assert context["capabilities"]["drop"] == ["ALL"]
    assert {f"CAP_{cap}" for cap in context["capabilities"]["add"]} == CAPABILITIES


def test_daemonset_mounts() -> None:
    spec = _pod_spec()
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    mounts = {mount["mountPath"]: mount for mount in _container()["volumeMounts"]}
    assert {mount["name"] for mount in mounts.values()} == set(volumes)

    def host_path(mount_path: str) -> str:
        path: str = volumes[mounts[mount_path]["name"]]["hostPath"]["path"]
        return path

    # Host directories, all read-only, each at the same path in the container.
    for path in ("/sys/kernel/tracing", "/sys/kernel/btf", "/lib/modules", "/usr/src"):
        assert host_path(path) == path
        assert mounts[path]["readOnly"] is True, path
    assert mounts["/sys/kernel/tracing"]["mountPropagation"] == "HostToContainer"
    # Scratch space for a read-only root filesystem.
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    # The unix socket, shared with the node so that `tcptrace-ebpf closewait`
    # there reaches the daemon.
    assert host_path("/run/tcptrace-ebpf") == "/run/tcptrace-ebpf"
    assert mounts["/run/tcptrace-ebpf"].get("readOnly", False) is False
    # Nothing is pinned in bpffs (documented in the file).
    assert "/sys/fs/bpf" not in mounts
    assert "Not mounted: /sys/fs/bpf" in DAEMONSET.read_text(encoding="utf-8")
    # Pods and containers: the cgroup tree away from the container's own
    # cgroup namespace (the daemon is told where), the kubelet's log
    # directories (names only) where the kubelet keeps them; all read-only.
    assert host_path("/host/sys/fs/cgroup") == "/sys/fs/cgroup"
    env = {item["name"]: item["value"] for item in _container()["env"]}
    assert env["TCPTRACE_CGROUP2_ROOT"] == "/host/sys/fs/cgroup"
    for path in ("/host/sys/fs/cgroup", "/var/log/pods", "/var/log/containers"):
        assert mounts[path]["readOnly"] is True, path
    assert host_path("/var/log/pods") == "/var/log/pods"
    assert host_path("/var/log/containers") == "/var/log/containers"
    # Nothing else from the host.
    host_paths = {v["hostPath"]["path"] for v in volumes.values() if "hostPath" in v}
    assert host_paths == {
        "/sys/kernel/tracing",
        "/sys/kernel/btf",
        "/lib/modules",
        "/usr/src",
        "/run/tcptrace-ebpf",
        "/sys/fs/cgroup",
        "/var/log/pods",
        "/var/log/containers",
    }


def test_daemonset_serves_metrics_and_probes_them() -> None:
    container = _container()
    args = container["args"]
    assert args[0] == "serve"
    (listen,) = [a.split("=", 1)[1] for a in args if a.startswith("--web.listen-address=")]
    port = parse_listen_address(listen)[1]
    assert port == DEFAULT_PORT
    (container_port,) = container["ports"]
    assert container_port == {"name": "metrics", "containerPort": port, "protocol": "TCP"}
    # Ready only once the BPF program is attached; healthy while serving.
    expected_paths = {
        "startupProbe": "/-/ready",
        "livenessProbe": "/-/healthy",
        "readinessProbe": "/-/ready",
    }
    for probe, probe_path in expected_paths.items():
        http_get = container[probe]["httpGet"]
        assert http_get["path"] == probe_path, probe
        assert http_get["port"] in ("metrics", port), probe
    annotations = _daemonset()["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"


def test_daemonset_resources() -> None:
    resources = _container()["resources"]
    assert resources["requests"]["cpu"]
    assert resources["requests"]["memory"]
    assert resources["limits"]["memory"]
    # A CPU limit throttles the tracer into losing events (documented).
    assert "cpu" not in resources["limits"]


# ---------------------------------------------------------------------------
# Prometheus scrape config
# ---------------------------------------------------------------------------

_VARIANT_START = re.compile(r"^# ---- Variant: (?P<name>[\w-]+) ----$")
_VARIANT_END = "# ---- end of variant ----"


def scrape_config_variants() -> dict[str, list[dict[str, Any]]]:
    """{variant: scrape_configs}: "default" is the live YAML, the others are
    the commented-out alternatives (their YAML lines start with "#  ")."""
    text = SCRAPE_CONFIG.read_text(encoding="utf-8")
    variants = {"default": yaml.safe_load(text)["scrape_configs"]}
    name = None
    lines: list[str] = []
    for line in text.splitlines():
        start = _VARIANT_START.match(line)
        if start:
            assert name is None, line
            name, lines = start["name"], []
        elif line == _VARIANT_END:
            assert name is not None
            variants[name] = yaml.safe_load("\n".join(lines))
            name = None
        elif name is not None and line.startswith("#  "):
            lines.append(line[1:])
    assert name is None, f"variant {name} has no end marker"
    return variants


def test_scrape_config_variants() -> None:
    variants = scrape_config_variants()
    assert set(variants) == {"default", "kubernetes", "tls-basic-auth"}
    for name, configs in variants.items():
        assert [config["job_name"] for config in configs] == ["tcptrace"], name
    static = variants["default"][0]["static_configs"]
    targets = [target for group in static for target in group["targets"]]
    assert targets
    assert all(target.endswith(f":{DEFAULT_PORT}") for target in targets)
    assert variants["kubernetes"][0]["kubernetes_sd_configs"][0]["role"] == "pod"
    assert variants["tls-basic-auth"][0]["scheme"] == "https"
    assert "basic_auth" in variants["tls-basic-auth"][0]


def _promtool_check_config(variant: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """promtool check config on a minimal prometheus.yml with the variant's job
    and the alert rules."""
    promtool = require_tool("promtool", "prometheus")
    config = {
        "global": {"scrape_interval": "15s", "evaluation_interval": "15s"},
        "rule_files": [str(ALERT_RULES)],
        "scrape_configs": scrape_config_variants()[variant],
    }
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return subprocess.run(
        [promtool, "check", "config", str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("variant", ["default", "tls-basic-auth"])
def test_promtool_accepts_scrape_config(variant: str, tmp_path: Path) -> None:
    result = _promtool_check_config(variant, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


# Debian's Prometheus is built without Kubernetes service discovery, so its
# promtool rejects kubernetes_sd_configs as an unknown field.
_NO_KUBERNETES_SD = "field kubernetes_sd_configs not found in type config.ScrapeConfig"


def test_promtool_accepts_kubernetes_scrape_config(tmp_path: Path) -> None:
    """The Kubernetes variant passes promtool, or, with a promtool built
    without Kubernetes discovery (Debian's), fails on that field alone: every
    other field of the job is still parsed, and its relabelling is checked
    here."""
    result = _promtool_check_config("kubernetes", tmp_path)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        errors = [line.strip() for line in output.splitlines() if re.match(r"\s*line \d+:", line)]
        assert errors, output
        assert all(error.endswith(_NO_KUBERNETES_SD) for error in errors), output
    (job,) = scrape_config_variants()["kubernetes"]
    (discovery,) = job["kubernetes_sd_configs"]
    namespace = _daemonset()["metadata"]["namespace"]
    assert discovery["namespaces"]["names"] == [namespace]
    pod_labels = _daemonset()["spec"]["template"]["metadata"]["labels"]
    (selector,) = discovery["selectors"]
    label, _, value = selector["label"].partition("=")
    assert pod_labels[label] == value
    port_names = {port["name"] for port in _container()["ports"]}
    for relabel in job["relabel_configs"]:
        assert relabel.get("action", "replace") in ("keep", "replace"), relabel
        assert all(s.startswith("__meta_kubernetes_pod_") for s in relabel["source_labels"])
        if relabel.get("action") == "keep":
            assert relabel["source_labels"] == ["__meta_kubernetes_pod_container_port_name"]
            assert re.fullmatch(relabel["regex"], "metrics")
            assert "metrics" in port_names


# ---------------------------------------------------------------------------
# Grafana provisioning and the README
# ---------------------------------------------------------------------------


def test_grafana_dashboard_provider() -> None:
    config = yaml.safe_load((GRAFANA / "dashboards" / "tcptrace.yml").read_text(encoding="utf-8"))
    assert config["apiVersion"] == 1
    (provider,) = config["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"].startswith("/")
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    assert provider["options"]["path"] in readme
    assert set(DASHBOARD_FILES) <= set(os.listdir(REPO / "dashboards"))


def test_grafana_datasource() -> None:
    config = yaml.safe_load(
        (GRAFANA / "datasources" / "prometheus.yml").read_text(encoding="utf-8")
    )
    assert config["apiVersion"] == 1
    (datasource,) = config["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["access"] == "proxy"
    assert datasource["url"].startswith(("http://", "https://"))


def test_readme_has_the_fleet_section() -> None:
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    assert re.search(r"^## Monitoring a fleet$", readme, re.M)
    for path in (SCRAPE_CONFIG, ALERT_RULES, GRAFANA / "dashboards" / "tcptrace.yml"):
        assert path.relative_to(DEPLOY).as_posix() in readme, path
