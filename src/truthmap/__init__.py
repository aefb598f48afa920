"""truthmap: find where a language model knows that it is wrong."""

from truthmap.errors import ConfigError, DataError, ModelError, ProbeError, StoreError, TruthmapError

__version__ = "0.1.0"

__all__ = ["ConfigError", "DataError", "ModelError", "ProbeError", "StoreError", "TruthmapError", "__version__"]
