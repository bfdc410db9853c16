"""The HTTP(S) server that exposes the metrics, and its exporter-toolkit web
config file."""
