"""The package's version, with one source: `version` in pyproject.toml, read back from the installed metadata."""

from importlib import metadata

try:
    __version__ = metadata.version("hf_l2")
except metadata.PackageNotFoundError:  # a source tree put on sys.path without being installed
    __version__ = "0+unknown"
