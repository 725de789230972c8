"""The typed error of config files and overrides."""

from typing import Optional

from ..errors import ConfigError

__all__ = ["ConfigFileError"]


class ConfigFileError(ConfigError):
    """A config file or `-o` override is wrong: unknown key, bad value, broken `_BASE_`.

    Args:
        message: the one-line message.
        source: the file (or '-o') concerned, when there is one.
        key: the dotted key concerned, when there is one.
    """

    def __init__(self, message: str, source: Optional[str] = None, key: Optional[str] = None):
        super().__init__(message)
        self.source = source
        self.key = key
