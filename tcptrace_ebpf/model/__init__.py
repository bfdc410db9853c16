"""Pure logic, no I/O: TCP states, address pairs, event decoding, the lifecycle
engine, and the CLOSE_WAIT and TIME_WAIT views the commands and the daemon show."""
