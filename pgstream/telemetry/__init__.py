"""What ``pgstream run`` tells an operator's tools: Prometheus metrics and JSON log lines.

Both plug into the runtime from outside: metrics are a
:class:`~pgstream.runtime.observers.WorkerObserver`, JSON logs a :mod:`logging` formatter. The
runtime never imports this package (nor ``prometheus-client``).
"""
