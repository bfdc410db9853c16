"""`tcptrace-ebpf timewait`: TIME_WAIT pressure, from a sock_diag listing, with
the programs behind it when the daemon runs (model/timewait.py groups)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import click

from ..host import sockdiag
from ..host.listeners import own_netns_inum
from ..model.addresses import AddressPair
from ..model.timewait import Pressure, by_workload, pressure
from ..serve.api import ApiUnavailable, query
from .output import notice
from .render import time_wait_table


def ephemeral_range(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> tuple[int, int]:
    try:
        low, high = (int(part) for part in Path(path).read_text().split())
    except (OSError, ValueError):
        return (32768, 60999)  # the kernel's default
    return (low, high)


def gather(
    owners: Mapping[AddressPair, str] | None,
    netns: int,
    daemon_items: Iterable[Mapping[str, Any]] = (),
) -> Pressure:
    view = pressure(sockdiag.snapshot(), ephemeral_range(), owners, netns)
    view.workloads = by_workload(daemon_items)
    return view


def owners_from_api(data: Iterable[Mapping[str, Any]], netns: int) -> dict[AddressPair, str]:
    """The program behind each timewait socket of network namespace `netns`
    (0 in the daemon's list: the kernel could not tell, taken as ours)."""
    return {
        AddressPair.from_json(item, netns): str(item["comm"])
        for item in data
        if item["netns"] in (netns, 0)
    }


def run_timewait(top: int, as_json: bool, api_socket: str) -> None:
    netns = own_netns_inum()
    owners: dict[AddressPair, str] | None = None
    data: list[dict[str, Any]] = []
    try:
        data = query(Path(api_socket), "time_wait", timeout=10.0)
    except ApiUnavailable as err:
        hint = "; start 'tcptrace-ebpf serve' to know them" if err.no_daemon else ""
        notice(f"programs unknown: {err}{hint}")
    else:
        try:
            owners = owners_from_api(data, netns)
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError):
            # Valid JSON, but not our daemon's list (see closewait).
            notice(f"programs unknown: the daemon at {api_socket} sent a malformed answer")
            owners = None
            data = []
    view = gather(owners, netns, data)
    if as_json:
        click.echo(json.dumps(view.to_json(top), separators=(",", ":")))
        return
    for line in time_wait_table(view, top):
        click.echo(line)
