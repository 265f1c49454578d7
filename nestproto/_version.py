"""The version, in one place (the entry map's C{server_version} reads it)."""

__version__ = "0.1.0"
