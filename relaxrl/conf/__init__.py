"""Shipped YAML configs. Importing this package registers the typed schemas they build on."""

import relaxrl.config  # noqa: F401
