"""Runtime: the offloaded expert runner and its counters."""
