"""What the host tells outside BPF: sock_diag listings, /proc (socket holders,
processes, cgroups), network namespaces, container and pod names, and the
start-up snapshot of sockets older than the tracer; and giving the process's
freed memory back to it."""
