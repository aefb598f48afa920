"""Errors a user can act on. Library code raises these; only the CLI prints them."""


class TruthmapError(Exception):
    """One line: what failed (file, row, column, option), the value received, and what to do."""


class DataError(TruthmapError):
    """A dataset file is missing, unreadable or malformed."""


class ModelError(TruthmapError):
    """A model cannot be found, loaded or understood."""


class ConfigError(TruthmapError):
    """An option or saved configuration is invalid or does not match the run on disk."""


class ProbeError(TruthmapError):
    """A probe cannot be fitted or scored on the data given."""


class TruthmapWarning(UserWarning):
    """Something the user may not expect, but not wrong: the CLI prints it as one `Warning: ...` line."""
