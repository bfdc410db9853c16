"""tcptrace-ebpf: every TCP socket's lifecycle, traced in the Linux kernel."""

__version__ = "0.1.0"
