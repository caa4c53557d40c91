"""The error a user can fix in a config, below both `common.config` (which raises it) and `common.cli` (which turns
it into a one-line message and exit status 2)."""


class ConfigError(ValueError):
    """A config file or override does not match its schema. The message says where and how to fix it."""
