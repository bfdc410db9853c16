"""`tcptrace-ebpf serve`: the daemon, its Prometheus collector, its local API, and
what it keeps beside the kernel (CLOSE_WAIT holders, port labels)."""
