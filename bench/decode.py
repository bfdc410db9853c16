"""Measure what each event costs in Python: decoding, the JSON line, lifecycles.

Builds `--events` raw `struct tt_event`s from the recorded streams in
tests/data/streams (copied over and over, each copy with lifecycle ids and
ports of its own, so caches see what real churn shows them: a few events per
address pair), then, in a fresh interpreter per round, times per event:

- `decode`: `Decoder.decode` (trace's text lines, lifecycles);
- `json_line`: `Decoder.json_line` (trace --json, lifecycles --events-to);
- `lifecycles`: `decode` then `LifecycleEngine.feed` (lifecycles);
- `lifecycles_json`: that, and each finished lifecycle's JSON line
  (lifecycles --json), per event;
- `from_json`: `Event.from_json` of the JSON line (reading a recorded stream).

Each `--source` is a checkout whose package is measured (default: this one),
so two versions compare side by side, rounds alternating between them. Times
are CPU time (time the process waited for a CPU on a shared machine does not
count), and the numbers are the best round's.
Pure Python: no root, no BPF.

    .venv/bin/python bench/decode.py
    git archive <commit> tcptrace_ebpf | tar -x -C /tmp/old
    .venv/bin/python bench/decode.py --source . --source /tmp/old
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
STREAMS = HERE.parent / "tests" / "data" / "streams"

# Runs in a fresh interpreter with the measured checkout first on sys.path:
# argv[1] the stream directory, argv[2] the number of events. Prints JSON.
MEASURE = r"""
import json, socket, sys, time
from pathlib import Path
from tcptrace_ebpf.model.events import EVENT_STRUCT, Decoder, Event
from tcptrace_ebpf.model.lifecycle import LifecycleEngine

def packed(family, address):
    raw = socket.inet_pton(family, address)
    return raw.ljust(16, b"\0")

def moved(port, copy):
    return port and 1024 + (port + 7919 * copy) % 64000

streams = [
    [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for path in sorted(Path(sys.argv[1]).glob("*.events.jsonl"))
]
wanted = int(sys.argv[2])
raws, copy, next_sock = [], 0, 1
while len(raws) < wanted:
    for stream in streams:
        socks = {}
        for obj in stream:
            event = Event.from_json(obj)
            family = socket.AF_INET6 if obj["family"] == "ipv6" else socket.AF_INET
            sock = obj["sock"] and socks.setdefault(obj["sock"], next_sock + len(socks))
            raws.append(EVENT_STRUCT.pack(
                round(event.ts * 1e9), sock, 0xFFFF000012340000 + sock,
                round((event.duration_s or 0) * 1e9), event.pid, event.flags,
                packed(family, obj["laddr"]), packed(family, obj["raddr"]),
                moved(obj["lport"], copy), moved(obj["rport"], copy), family,
                event.seq, event.old_state, event.new_state, event.role,
                event.owner_source, event.tw_end, 0, event.syn_retrans,
                event.comm.encode()[:15].ljust(16, b"\0"), event.cgroup_id,
            ))
        next_sock += len(socks)
    copy += 1
raws = raws[:wanted]
decoder = Decoder(clock_offset_ns=1_700_000_000 * 10**9)
lines = [json.loads(decoder.json_line(raw)) for raw in raws]

def per_event(run):
    started = time.process_time()
    run()
    return (time.process_time() - started) / len(raws) * 1e9

def decode():
    decode = decoder.decode
    for raw in raws:
        decode(raw)

def json_line():
    line = decoder.json_line
    for raw in raws:
        line(raw)

def lifecycles():
    decode, feed = decoder.decode, LifecycleEngine().feed
    for raw in raws:
        feed(decode(raw))

def lifecycles_json():
    decode, feed = decoder.decode, LifecycleEngine().feed
    dumps = json.JSONEncoder(separators=(",", ":")).encode
    for raw in raws:
        for life in feed(decode(raw)):
            dumps(life.to_json())

def from_json():
    parse = Event.from_json
    for obj in lines:
        parse(obj)

print(json.dumps({name: per_event(run) for name, run in (
    ("decode", decode), ("json_line", json_line), ("lifecycles", lifecycles),
    ("lifecycles_json", lifecycles_json), ("from_json", from_json),
)}))
"""


def measure(source: Path, events: int) -> dict[str, float]:
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, str(STREAMS), str(events)],
        cwd=source,
        env={"PYTHONPATH": str(source), "PYTHONHASHSEED": "0"},
        check=True,
        capture_output=True,
        text=True,
    )
    measured: dict[str, float] = json.loads(result.stdout)
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--source", type=Path, action="append", help="a checkout (repeatable)")
    parser.add_argument("--events", type=int, default=100_000, help="raw events per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per source")
    args = parser.parse_args()
    sources = [path.resolve() for path in args.source or [HERE.parent]]
    results: dict[Path, list[dict[str, float]]] = {source: [] for source in sources}
    for _ in range(args.rounds):
        for source in sources:
            results[source].append(measure(source, args.events))
    print(f"ns per event, best of {args.rounds} rounds of {args.events} events")
    names = list(results[sources[0]][0])
    print(f"{'source':<40}" + "".join(f"{name:>16}" for name in names))
    for source, rounds in results.items():
        best = {name: min(r[name] for r in rounds) for name in names}
        print(f"{source!s:<40}" + "".join(f"{best[name]:>16.0f}" for name in names))


if __name__ == "__main__":
    main()
