"""Device kernels daop writes itself, where torch has none fast enough (each says why)."""
