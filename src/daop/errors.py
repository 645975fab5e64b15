"""User-facing errors: one clear line naming the file, tensor, field or limit."""


class DaopError(Exception):
    """An error caused by input (files, options, requests) rather than a bug; the CLI prints it as one line."""


class OutOfMemory(DaopError):
    """The device ran out of memory for one request; the engine has released it and serves the next one."""
