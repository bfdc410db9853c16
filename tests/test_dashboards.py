"""Lint for the Grafana dashboards in dashboards/.

Checks that each dashboard loads through Grafana file provisioning as it is
(a ``datasource`` variable, no ``__inputs``), that every panel says what it
shows (title, description, unit) and that every query is one Prometheus can
run against what ``tcptrace-ebpf serve`` exports: PromQL syntax (promtool),
metric and label names, label values, ``$job``/``$instance`` filters and
``$__rate_interval``.

Importable helpers for other tests (the end-to-end test that runs every
dashboard query against a real Prometheus):

* ``dashboard_queries()``: (dashboard file, panel title, expr) for every query;
* ``substitute(expr, job, instance, rate_interval)``: the same expr with the
  Grafana variables replaced;
* ``EXPORTED_METRICS``, ``lint_expr()``.

Needs promtool (Debian package ``prometheus``).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tcptrace_ebpf.kernel.interface import LOST_CAUSES
from tcptrace_ebpf.serve.metrics import catalog

REPO = Path(__file__).resolve().parent.parent
DASHBOARD_DIR = REPO / "dashboards"
DEPLOY_README = REPO / "deploy" / "README.md"

DASHBOARD_FILES = {
    "tcptrace-overview.json": "tcptrace-overview",
    "tcptrace-close-wait.json": "tcptrace-close-wait",
    "tcptrace-exporter.json": "tcptrace-exporter",
}

# ---------------------------------------------------------------------------
# What `tcptrace-ebpf serve` exports
# ---------------------------------------------------------------------------

# What `tcptrace-ebpf serve` exports, from the exporter itself (names without
# the _bucket/_sum/_count suffixes of histograms), plus prometheus_client's
# process collector.
_CATALOG = {info.name: info for info in catalog()}
PROCESS_METRICS = (
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_open_fds",
    "process_start_time_seconds",
)
EXPORTED_METRICS: tuple[str, ...] = (*_CATALOG, *PROCESS_METRICS)

# Which of EXPORTED_METRICS are histograms (queried as _bucket, _sum, _count).
HISTOGRAM_METRICS = frozenset(name for name, info in _CATALOG.items() if info.type == "histogram")

# Prometheus's own per-target series, which queries may use as well.
PROMETHEUS_METRICS = frozenset({"up"})

# Labels of each metric besides job and instance (and le on _bucket), as the
# exporter builds them. "port" appears only with --metrics.port-label.
METRIC_LABELS: dict[str, frozenset[str]] = {
    name: info.labels for name, info in _CATALOG.items() if info.labels
}

_STATES = frozenset(
    {
        "ESTABLISHED",
        "SYN_SENT",
        "SYN_RECV",
        "FIN_WAIT1",
        "FIN_WAIT2",
        "TIME_WAIT",
        "CLOSE",
        "CLOSE_WAIT",
        "LAST_ACK",
        "LISTEN",
        "CLOSING",
    }
)

# The values of the labels whose values are a fixed set.
LABEL_VALUES: dict[str, frozenset[str]] = {
    "state": _STATES,
    "old_state": _STATES,
    "new_state": _STATES,
    "role": frozenset({"client", "server", "unknown"}),
    "close": frozenset(
        {
            "active",
            "passive",
            "simultaneous",
            "reset_sent",
            "reset_received",
            "refused",
            "timeout",
            "connect_failed",
        }
    ),
    "end": frozenset({"expired", "reused", "killed"}),
    "cause": frozenset(LOST_CAUSES.values()),
}

_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

# Grafana unit ids the dashboards may use (a subset of Grafana's
# valueFormats/categories.ts), plus custom "suffix:"/"prefix:" units.
KNOWN_UNITS = frozenset(
    {
        "none",
        "short",
        "percent",
        "percentunit",
        "s",
        "ms",
        "µs",
        "ns",
        "m",
        "h",
        "d",
        "dtdurations",
        "dtdurationms",
        "bytes",
        "decbytes",
        "ops",
        "cps",
        "reqps",
        "hertz",
        "string",
    }
)

DATASOURCE_REF = {"type": "prometheus", "uid": "${datasource}"}

# ---------------------------------------------------------------------------
# Helpers for other tests
# ---------------------------------------------------------------------------


def load_dashboard(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DASHBOARD_DIR / name).read_text(encoding="utf-8"))
    return data


def iter_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows and the panels inside collapsed rows included."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard file name, panel title, PromQL expr) for every panel query.

    The exprs still hold Grafana variables ($job, $instance,
    $__rate_interval): pass them through ``substitute`` before sending them
    to Prometheus. Template variable queries (label_values) are not included.
    """
    queries = []
    for name in sorted(DASHBOARD_FILES):
        for panel in iter_panels(load_dashboard(name)):
            for target in panel.get("targets", []):
                if target.get("expr"):
                    queries.append((name, panel.get("title", ""), target["expr"]))
    return queries


_VARIABLE_RE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
_DURATION_RE = re.compile(r"(?:[0-9]+(?:ms|s|m|h|d|w|y))+")


def substitute(expr: str, job: str, instance: str, rate_interval: str = "1m") -> str:
    """Replace the Grafana variables of a dashboard query, as Grafana would.

    ``job`` and ``instance`` go as they are into the ``=~`` matchers, so they
    are regular expressions, like Grafana's multi-value variables: ".*" for
    every target, "tcptrace" for one job, "a:10072|b:10072" for two hosts.
    ``rate_interval`` (a Prometheus duration) replaces ``$__rate_interval``
    and ``$__interval``; Grafana makes $__rate_interval at least four scrape
    intervals, so give at least that for rate() to have enough samples.

    Both the ``$name`` and ``${name}`` forms are replaced. Raises ValueError
    for any other variable (a new one in a dashboard must be added here) and
    for values that would break out of a PromQL string.
    """
    if not _DURATION_RE.fullmatch(rate_interval):
        raise ValueError(f"rate_interval {rate_interval!r} is not a Prometheus duration")
    for label, value in (("job", job), ("instance", instance)):
        if '"' in value or "\\" in value:
            raise ValueError(f"{label} {value!r} has a quote or backslash")
    values = {
        "job": job,
        "instance": instance,
        "__rate_interval": rate_interval,
        "__interval": rate_interval,
    }

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise ValueError(f"unknown Grafana variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE_RE.sub(replace, expr)


def require_tool(name: str, package: str) -> str:
    """Path of a command-line tool, or fail saying which Debian package has it."""
    # /usr/sbin is not on every user's PATH.
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        pytest.fail(
            f"{name} is not installed: install Debian's {package} package"
            f" (apt-get install {package})",
            pytrace=False,
        )
    return path


# ---------------------------------------------------------------------------
# A small PromQL reader: enough to find selectors, calls and groupings
# ---------------------------------------------------------------------------

AGGREGATIONS = frozenset(
    {
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
    }
)
FUNCTIONS = frozenset(
    {
        "abs",
        "absent",
        "absent_over_time",
        "avg_over_time",
        "ceil",
        "changes",
        "clamp",
        "clamp_max",
        "clamp_min",
        "count_over_time",
        "delta",
        "deriv",
        "exp",
        "floor",
        "histogram_quantile",
        "idelta",
        "increase",
        "irate",
        "label_join",
        "label_replace",
        "last_over_time",
        "ln",
        "log10",
        "log2",
        "max_over_time",
        "min_over_time",
        "predict_linear",
        "quantile_over_time",
        "rate",
        "resets",
        "round",
        "scalar",
        "sort",
        "sort_desc",
        "sqrt",
        "sum_over_time",
        "time",
        "timestamp",
        "vector",
    }
)
COUNTER_FUNCTIONS = frozenset({"rate", "irate", "increase", "resets"})
GAUGE_FUNCTIONS = frozenset({"deriv", "delta", "idelta", "predict_linear"})
RATE_INTERVAL_FUNCTIONS = frozenset({"rate", "irate", "increase"})
GROUPING_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan"})

_TOKEN_RE = re.compile(
    r"""
      (?P<ws>\s+)
    | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    | (?P<braces>\{(?:[^{}"]|"(?:[^"\\]|\\.)*")*\})
    | (?P<range>\[[^\]]*\])
    | (?P<number>(?:0x[0-9a-fA-F]+|[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)(?![A-Za-z_:]))
    | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
    | (?P<lparen>\()
    | (?P<rparen>\))
    | (?P<comma>,)
    | (?P<op>==|!=|>=|<=|[-+*/%^<>@])
    """,
    re.VERBOSE,
)
_MATCHER_RE = re.compile(
    r'\s*(?P<label>[A-Za-z_][A-Za-z0-9_]*)\s*(?P<op>=~|!~|!=|=)\s*"(?P<value>(?:[^"\\]|\\.)*)"\s*(?:,|$)'
)
_PLAIN_ALTERNATIVES_RE = re.compile(r"[A-Za-z0-9_]+(?:\|[A-Za-z0-9_]+)*")


@dataclass
class Selector:
    name: str
    matchers: list[tuple[str, str, str]]
    range: str | None
    # Functions and aggregations around it, outermost first.
    enclosing: tuple[str, ...]


@dataclass
class ParsedExpr:
    selectors: list[Selector] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    groupings: list[tuple[str, list[str]]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _tokenize(expr: str) -> tuple[list[tuple[str, str]], list[str]]:
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(expr):
        match = _TOKEN_RE.match(expr, pos)
        if match is None:
            return tokens, [f"cannot read the query at {expr[pos : pos + 20]!r}"]
        kind = match.lastgroup or ""
        if kind != "ws":
            tokens.append((kind, match.group()))
        pos = match.end()
    return tokens, []


def _parse_matchers(text: str) -> tuple[list[tuple[str, str, str]], list[str]]:
    inner = text[1:-1]
    matchers: list[tuple[str, str, str]] = []
    pos = 0
    while inner[pos:].strip():
        match = _MATCHER_RE.match(inner, pos)
        if match is None:
            return matchers, [f"cannot read label matchers {text!r}"]
        matchers.append((match["label"], match["op"], match["value"]))
        pos = match.end()
    return matchers, []


def parse_expr(expr: str) -> ParsedExpr:
    """Selectors (with their enclosing calls), calls and groupings of a query."""
    parsed = ParsedExpr()
    tokens, parsed.problems = _tokenize(expr)
    stack: list[str | None] = []
    pending: str | None = None
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1][0] if i + 1 < len(tokens) else None
        word = text.lower()
        if kind == "ident" and word in GROUPING_KEYWORDS:
            labels: list[str] = []
            i += 1
            if following == "lparen":
                i += 1
                while i < len(tokens) and tokens[i][0] != "rparen":
                    if tokens[i][0] == "ident":
                        labels.append(tokens[i][1])
                    i += 1
                i += 1
            parsed.groupings.append((word, labels))
            continue
        if kind == "ident" and word in AGGREGATIONS:
            pending = word
            parsed.calls.append(word)
        elif kind == "ident" and following == "lparen":
            if word not in FUNCTIONS:
                parsed.problems.append(f"unknown function {text}()")
            pending = word
            parsed.calls.append(word)
        elif kind == "ident" and word in KEYWORDS:
            pass
        elif kind in ("ident", "braces"):
            name = text if kind == "ident" else ""
            matchers: list[tuple[str, str, str]] = []
            if kind == "braces":
                i -= 1  # the braces are this token
            if i + 1 < len(tokens) and tokens[i + 1][0] == "braces":
                matchers, problems = _parse_matchers(tokens[i + 1][1])
                parsed.problems.extend(problems)
                i += 1
            range_ = None
            if i + 1 < len(tokens) and tokens[i + 1][0] == "range":
                range_ = tokens[i + 1][1][1:-1].strip()
                i += 1
            enclosing = tuple(owner for owner in stack if owner)
            parsed.selectors.append(Selector(name, matchers, range_, enclosing))
        elif kind == "lparen":
            stack.append(pending)
            pending = None
        elif kind == "rparen":
            if not stack:
                parsed.problems.append("unbalanced parentheses")
                return parsed
            stack.pop()
        i += 1
    if stack:
        parsed.problems.append("unbalanced parentheses")
    return parsed


def _base_metric(name: str) -> tuple[str, str]:
    """(exported metric name, histogram suffix or "")."""
    for suffix in _HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and name[: -len(suffix)] in HISTOGRAM_METRICS:
            return name[: -len(suffix)], suffix
    return name, ""


def lint_expr(expr: str, *, dashboard: bool = True) -> list[str]:
    """Problems with a query; an empty list when it is fine.

    Always: metric names are exported ones, label names exist on the
    metric, values of enumerated labels are real values, counters only go
    into rate()-like functions and gauges into deriv()-like ones, grouping
    labels exist, histogram_quantile() keeps le. With ``dashboard``, also:
    every selector filters on job=~"$job" and instance=~"$instance", every
    rate()/irate()/increase() uses [$__rate_interval], and every selector is
    aggregated (so that optional labels such as port never split a series).
    """
    parsed = parse_expr(expr)
    problems = list(parsed.problems)
    known_labels = {"job", "instance"}
    for selector in parsed.selectors:
        base, suffix = _base_metric(selector.name)
        known_labels |= METRIC_LABELS.get(base, frozenset())
        if suffix == "_bucket":
            known_labels.add("le")
    for selector in parsed.selectors:
        name = selector.name
        base, suffix = _base_metric(name)
        if not name:
            problems.append(f"selector {selector.matchers} has no metric name")
            continue
        if base in HISTOGRAM_METRICS and not suffix:
            problems.append(f"{name} is a histogram: query {name}_bucket, _sum or _count")
        elif base not in EXPORTED_METRICS and base not in PROMETHEUS_METRICS:
            problems.append(f"{name} is not an exported metric")
        allowed = {"job", "instance"} | METRIC_LABELS.get(base, frozenset())
        if suffix == "_bucket":
            allowed.add("le")
        for label, op, value in selector.matchers:
            if label not in allowed:
                problems.append(f"{name} has no label {label!r}")
            values = LABEL_VALUES.get(label)
            if values is None or op not in ("=", "=~"):
                continue
            if op == "=~" and not _PLAIN_ALTERNATIVES_RE.fullmatch(value):
                continue
            for alternative in value.split("|"):
                if alternative not in values:
                    problems.append(f"{name}: {label}={alternative!r} is not a value it takes")
        innermost = selector.enclosing[-1] if selector.enclosing else None
        if innermost in COUNTER_FUNCTIONS and not (
            name.endswith("_total") or suffix in _HISTOGRAM_SUFFIXES
        ):
            problems.append(f"{innermost}() of {name}, which is not a counter")
        if innermost in GAUGE_FUNCTIONS and (name.endswith("_total") or suffix):
            problems.append(f"{innermost}() of {name}, which is not a gauge")
        if innermost in RATE_INTERVAL_FUNCTIONS and selector.range is None:
            problems.append(f"{innermost}() of {name} without a range")
        if dashboard:
            for label, variable in (("job", "$job"), ("instance", "$instance")):
                if (label, "=~", variable) not in selector.matchers:
                    problems.append(f'{name} does not filter on {label}=~"{variable}"')
            if innermost in RATE_INTERVAL_FUNCTIONS and selector.range not in (
                None,
                "$__rate_interval",
            ):
                problems.append(
                    f"{innermost}() of {name} over [{selector.range}], not [$__rate_interval]"
                )
            if not any(owner in AGGREGATIONS for owner in selector.enclosing):
                problems.append(
                    f"{name} is not aggregated (sum by (...) etc.): optional labels such as"
                    " port would split its series"
                )
    for keyword, labels in parsed.groupings:
        for label in labels:
            if label not in known_labels:
                problems.append(f"{keyword} ({label}): no metric in the query has that label")
    if "histogram_quantile" in parsed.calls and not any(
        "le" in labels for keyword, labels in parsed.groupings if keyword == "by"
    ):
        problems.append("histogram_quantile() over buckets not aggregated by le")
    return problems


# ---------------------------------------------------------------------------
# The lint checks itself: each bad query must be caught
# ---------------------------------------------------------------------------

_F = 'job=~"$job", instance=~"$instance"'


@pytest.mark.parametrize(
    ("expr", "problem"),
    [
        ('sum(tcptrace_sockets{instance=~"$instance"})', 'filter on job=~"$job"'),
        ('sum(tcptrace_sockets{job=~"$job"})', 'filter on instance=~"$instance"'),
        (f"sum(rate(tcptrace_events_total{{{_F}}}[5m]))", "not [$__rate_interval]"),
        (f"sum(tcptrace_socket{{{_F}}})", "not an exported metric"),
        (f'sum(tcptrace_sockets{{{_F}, state="ESTABLISHD"}})', "not a value it takes"),
        (
            f'sum(rate(tcptrace_connections_closed_total{{{_F}, close=~"refused|rst"}}'
            "[$__rate_interval]))",
            "'rst' is not a value",
        ),
        (f'sum(tcptrace_sockets{{{_F}, role="client"}})', "has no label 'role'"),
        (f"tcptrace_sockets{{{_F}}}", "not aggregated"),
        (f"sum(rate(tcptrace_sockets{{{_F}}}[$__rate_interval]))", "not a counter"),
        (f"sum(deriv(tcptrace_events_total{{{_F}}}[30m]))", "not a gauge"),
        (
            f"sum by (reason) (rate(tcptrace_lost_events_total{{{_F}}}[$__rate_interval]))",
            "by (reason)",
        ),
        (
            "histogram_quantile(0.9, sum by (role) (rate("
            f"tcptrace_handshake_duration_seconds_bucket{{{_F}}}[$__rate_interval])))",
            "not aggregated by le",
        ),
        (f"sum(tcptrace_handshake_duration_seconds{{{_F}}})", "is a histogram"),
        (f"sum(histogram_quantil(0.9, tcptrace_sockets{{{_F}}}))", "unknown function"),
        (f"sum(rate(tcptrace_events_total{{{_F}}}))", "without a range"),
        (f"sum(tcptrace_sockets{{{_F}}}", "unbalanced"),
        (f'sum({{{_F}, __name__="tcptrace_sockets"}})', "no metric name"),
    ],
)
def test_lint_catches(expr: str, problem: str) -> None:
    problems = lint_expr(expr)
    assert any(problem in p for p in problems), problems


@pytest.mark.parametrize(
    "expr",
    [
        f"sum by (job, instance) (rate(tcptrace_events_total{{{_F}}}[$__rate_interval]))",
        "histogram_quantile(0.99, sum by (le, role) (rate("
        f"tcptrace_handshake_duration_seconds_bucket{{{_F}}}[$__rate_interval])))",
        f'sum(rate(tcptrace_connections_closed_total{{{_F}, close=~"refused|timeout"}}'
        "[$__rate_interval])) by (role)",
        f"count(up{{{_F}}} == 0) or vector(0)",
        f"max by (instance) (time() - process_start_time_seconds{{{_F}}})",
    ],
)
def test_lint_accepts(expr: str) -> None:
    assert lint_expr(expr) == []


def test_lint_alert_mode_skips_dashboard_rules() -> None:
    expr = 'up{job="tcptrace"} == 0 or absent(up{job="tcptrace"})'
    assert lint_expr(expr, dashboard=False) == []
    assert lint_expr(expr)  # a dashboard query would need the variables


def test_substitute() -> None:
    expr = (
        'sum(rate(tcptrace_events_total{job=~"$job", instance=~"${instance}"}[$__rate_interval]))'
    )
    assert substitute(expr, "tcptrace", "node1:10072|node2:10072", "2m") == (
        'sum(rate(tcptrace_events_total{job=~"tcptrace", instance=~"node1:10072|node2:10072"}[2m]))'
    )
    assert "$" not in substitute(expr, ".*", ".*")
    with pytest.raises(ValueError, match="unknown Grafana variable"):
        substitute("sum(x[$__range])", ".*", ".*")
    with pytest.raises(ValueError, match="quote"):
        substitute(expr, 'a"}', ".*")
    with pytest.raises(ValueError, match="duration"):
        substitute(expr, ".*", ".*", "1 minute")


# ---------------------------------------------------------------------------
# The dashboards
# ---------------------------------------------------------------------------


def test_dashboard_files_are_the_expected_ones() -> None:
    assert {p.name for p in DASHBOARD_DIR.glob("*.json")} == set(DASHBOARD_FILES)


@pytest.fixture(params=sorted(DASHBOARD_FILES), name="dashboard_file")
def _dashboard_file(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


def test_dashboard_is_provisionable(dashboard_file: str) -> None:
    text = (DASHBOARD_DIR / dashboard_file).read_text(encoding="utf-8")
    dashboard = json.loads(text)
    # __inputs/__requires are for the import dialog; file provisioning would
    # leave ${DS_...} placeholders unresolved.
    assert "__inputs" not in dashboard
    assert "__requires" not in dashboard
    assert "${DS_" not in text
    assert dashboard["uid"] == DASHBOARD_FILES[dashboard_file]
    assert dashboard.get("id") is None
    assert dashboard["title"]
    assert dashboard["description"]
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert "tcptrace" in dashboard["tags"]


def test_dashboard_variables(dashboard_file: str) -> None:
    variables = {v["name"]: v for v in load_dashboard(dashboard_file)["templating"]["list"]}
    datasource = variables["datasource"]
    assert datasource["type"] == "datasource"
    assert datasource["query"] == "prometheus"
    for name in ("job", "instance"):
        variable = variables[name]
        assert variable["type"] == "query"
        assert variable["datasource"] == DATASOURCE_REF
        query = variable["query"]
        query = query["query"] if isinstance(query, dict) else query
        match = re.fullmatch(r"label_values\((?P<selector>.+),\s*(?P<label>\w+)\)", query)
        assert match, query
        assert match["label"] == name
        selectors = parse_expr(match["selector"]).selectors
        assert [s.name for s in selectors] == ["tcptrace_build_info"], query
        if name == "instance":
            # The instance list follows the chosen jobs.
            assert ("job", "=~", "$job") in selectors[0].matchers, query
        # "All" must expand to the values found (no allValue such as ".*"):
        # with ".*" the process_* panels would show every exporter's process.
        assert variable["includeAll"] is True
        assert not variable.get("allValue")


def test_panels_are_described(dashboard_file: str) -> None:
    dashboard = load_dashboard(dashboard_file)
    ids = []
    for panel in iter_panels(dashboard):
        ids.append(panel["id"])
        title = panel.get("title", "")
        assert title.strip(), panel
        if panel["type"] == "row":
            continue
        where = f"{dashboard_file}: {title}"
        assert panel["type"] in ("timeseries", "stat", "heatmap", "table"), where
        assert len(panel.get("description", "")) > 20, where
        unit = panel["fieldConfig"]["defaults"].get("unit", "")
        assert unit in KNOWN_UNITS or unit.startswith(("suffix:", "prefix:")), where
        assert panel["datasource"] == DATASOURCE_REF, where
        assert panel["targets"], where
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), where
        for target in panel["targets"]:
            assert target.get("datasource", DATASOURCE_REF) == DATASOURCE_REF, where
            assert target["expr"].strip(), where
            if panel["type"] == "heatmap":
                assert target.get("format") == "heatmap", where
            if panel["type"] == "table":
                assert target.get("instant") is True, where
                assert target.get("format") == "table", where
    assert len(ids) == len(set(ids)), f"{dashboard_file}: duplicate panel ids"


def test_panels_do_not_overlap(dashboard_file: str) -> None:
    boxes = []
    for panel in load_dashboard(dashboard_file)["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0, panel["title"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        boxes.append((panel["title"], pos["x"], pos["y"], pos["x"] + pos["w"], pos["y"] + pos["h"]))
    for i, (title_a, ax0, ay0, ax1, ay1) in enumerate(boxes):
        for title_b, bx0, by0, bx1, by1 in boxes[i + 1 :]:
            overlap = ax0 < bx1 and bx0 < ax1 and ay0 < by1 and by0 < ay1
            assert not overlap, f"{dashboard_file}: {title_a!r} overlaps {title_b!r}"


def test_a_collapsed_row_nests_its_panels() -> None:
    # The lint must see inside collapsed rows; the overview has one.
    rows = [p for p in load_dashboard("tcptrace-overview.json")["panels"] if p["type"] == "row"]
    assert any(row["collapsed"] and row["panels"] for row in rows)
    nested = [q for q in dashboard_queries() if "Time spent in a state" in q[1]]
    assert nested


def test_no_foreign_datasources(dashboard_file: str) -> None:
    def walk(node: Any) -> Iterator[Any]:
        if isinstance(node, dict):
            if "datasource" in node:
                yield node["datasource"]
            for value in node.values():
                yield from walk(value)
        elif isinstance(node, list):
            for value in node:
                yield from walk(value)

    dashboard = load_dashboard(dashboard_file)
    dashboard.pop("annotations")  # Grafana's built-in annotation query
    for reference in walk(dashboard):
        assert reference == DATASOURCE_REF, reference


_QUERIES = dashboard_queries()


@pytest.mark.parametrize(
    ("dashboard_file", "title", "expr"),
    _QUERIES,
    ids=[f"{d.removesuffix('.json')}:{t}" for d, t, _ in _QUERIES],
)
def test_query_lint(dashboard_file: str, title: str, expr: str) -> None:
    assert lint_expr(expr) == []


def test_queries_cover_every_exported_metric() -> None:
    used = set()
    for _, _, expr in _QUERIES:
        for selector in parse_expr(expr).selectors:
            used.add(_base_metric(selector.name)[0])
    assert set(EXPORTED_METRICS) - used == set()


def test_queries_parse_with_promtool(tmp_path: Path) -> None:
    """Every query, its variables replaced, is valid PromQL for promtool."""
    promtool = require_tool("promtool", "prometheus")
    exprs = [
        (f"{name}: {title}", substitute(expr, ".*", ".*", "5m"))
        for name, title, expr in dashboard_queries()
    ]
    for name in sorted(DASHBOARD_FILES):
        for variable in load_dashboard(name)["templating"]["list"]:
            if variable["type"] == "query":
                query = variable["query"]
                query = query["query"] if isinstance(query, dict) else query
                selector = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)
                assert selector, query
                exprs.append((f"{name}: ${variable['name']}", substitute(selector[1], ".*", ".*")))
    rules = {
        "groups": [
            {
                "name": "dashboard-queries",
                "rules": [
                    {"record": f"dashboard:query_{i}:check", "expr": expr}
                    for i, (_, expr) in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False), encoding="utf-8")
    result = subprocess.run(
        [promtool, "check", "rules", str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    index = "\n".join(f"  query_{i}: {where}" for i, (where, _) in enumerate(exprs))
    assert result.returncode == 0, f"{result.stdout}{result.stderr}\nqueries:\n{index}"
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout


def test_readme_lists_every_panel() -> None:
    """deploy/README.md has one "- **title**: question" line per panel, and no stale ones."""
    listed = re.findall(r"^- \*\*(.+?)\*\*: \S", DEPLOY_README.read_text(encoding="utf-8"), re.M)
    titles = [
        panel["title"]
        for name in sorted(DASHBOARD_FILES)
        for panel in iter_panels(load_dashboard(name))
        if panel["type"] != "row"
    ]
    assert sorted(listed) == sorted(titles)
