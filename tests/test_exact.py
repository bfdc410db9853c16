"""Exactness against the kernel (issue 13): each test drives real sockets under
the real tracer and fails on a defect the tracer had.

The truth is the kernel's: `ss` for what exists now, the namespace's MIB
counters (nstat) for what happened.
"""

from __future__ import annotations

from typing import Any

from support import Peer, free_port, requires_root, run_cli, wait_for
from test_serve import delta, scrape, serving

CLOSED = "tcptrace_connections_closed_total"


def lives_on(run: Any, port: int) -> list[dict[str, Any]]:
    return [
        life
        for life in run.json_lines()
        if port in (life["lport"], life["rport"]) and life["role"] != "listener"
    ]


@requires_root
def test_connect_failing_before_its_syn_is_connect_failed() -> None:
    """connect() from an explicitly bound port whose address pair is in use
    fails at once with EADDRNOTAVAIL: no SYN left, so it did not time out.
    The socket has its local port already (bind), which is why the rule
    cannot be "no local port"."""
    port = free_port()
    with (
        serving("--port", str(port)) as (_run, http_port),
        run_cli("lifecycles", "--json", "--port", str(port)) as lives,
        Peer() as server,
        Peer() as first,
        Peer() as second,
    ):
        before = scrape(http_port)
        server.cmd(f"listen 127.0.0.1 {port}")
        cport = int(first.cmd(f"connect 127.0.0.1 {port} {free_port()}"))
        server.cmd("accept")
        ok, error = second.try_cmd(f"connect 127.0.0.1 {port} {cport}")
        assert (ok, error) == (False, "EADDRNOTAVAIL")
        wait_for(
            lambda: (
                delta(before, scrape(http_port), CLOSED, role="client", close="connect_failed") == 1
            ),
            timeout=30,
        )
        after = scrape(http_port)
        assert delta(before, after, CLOSED, role="client", close="timeout") == 0
        failed = wait_for(
            lambda: [life for life in lives_on(lives, port) if life["close"] is not None],
            timeout=30,
        )
    assert [life["close"] for life in failed] == ["connect_failed"]
    assert failed[0]["lport"] == cport
    assert failed[0]["syn_retrans"] == 0
