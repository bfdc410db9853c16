"""Everything that touches the kernel's BPF side: the program's build and load
(BCC in a child process, the compiled-program cache), bpf() and perf_event_open()
calls, tracefs formats, BTF offsets, feature detection, maps and the event buffer,
and the tracer that attaches the probes and reads what they produce.

Nothing here imports from `serve`, `web` or `commands`.
"""
