"""Error types shared by every moesim module. Each carries a one-line, user-facing message."""


class MoesimError(ValueError):
    """Base of moesim's user-facing errors: the CLI prints the message alone, no traceback."""


class TraceError(MoesimError):
    """A trace file or its metadata is not what moesim expects (message names file and column)."""


class ConfigError(MoesimError):
    """A configuration value is missing, of the wrong type or out of range (names the key)."""
