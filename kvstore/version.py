"""The release (as pyproject.toml has it), for ``kvstore --version``, Health
and the build-info metric: a leaf, so the CLI shows it without the store."""

VERSION = "0.1.0"
