"""Errors a user can act on. Library code raises these; only the CLI prints them.

One class per kind of mistake, raised where the mistake is seen:
- ConfigError: an option, parameter or configuration value is wrong (an unknown name, a value out of range).
- DataError: an input file or row (dataset, custom file, file of answers to score) is missing or malformed.
- ModelError: a model cannot be found, loaded or understood.
- StoreError: what truthmap saved (a run directory, an activation store, a detector) is missing, damaged,
  unfinished, in use, or was made with other settings than those asked for now.
ProbeError is the DataError of probing: the data given cannot be probed (too few errors, one class in a split).
"""

from __future__ import annotations

import difflib


class TruthmapError(Exception):
    """One line: what failed (file, row, column, option), the value received, and what to do."""


class ConfigError(TruthmapError):
    """An option, parameter or configuration value is invalid."""


class DataError(TruthmapError):
    """An input file or one of its rows is missing, unreadable or malformed."""


class ModelError(TruthmapError):
    """A model cannot be found, loaded or understood."""


class StoreError(TruthmapError):
    """A saved artifact (run directory, activation store, detector) is missing, damaged, unfinished, in use, or
    does not match the settings asked for."""


class ProbeError(DataError):
    """A probe cannot be fitted or scored on the data given."""


class TruthmapWarning(UserWarning):
    """Something the user may not expect, but not wrong: the CLI prints it as one `Warning: ...` line."""


def check_name(kind: str, value, names) -> None:
    """The one wording for a name outside a fixed set (dataset, site, token, dtype, split, ...): a ConfigError
    that names the parameter, the value, the close matches and every legal name.

    `kind` is the parameter as a user would say it ('dataset', 'token'); the CLI's flags carry the same names."""
    names = list(names)
    if value in names:
        return
    names = [str(n) for n in names]
    close = difflib.get_close_matches(str(value), names, n=3)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ConfigError(f"Unknown {kind} {value!r}.{hint} Available: {', '.join(names)}.")
