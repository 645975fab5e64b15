"""Executors: the only code that touches streams, threads and asynchronous copies."""
