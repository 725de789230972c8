"""The typed error of config files and overrides."""

from ..errors import ConfigError

__all__ = ["ConfigFileError"]


class ConfigFileError(ConfigError):
    """A config file or `-o` override is wrong: unknown key, bad value, broken `_BASE_`.

    `source` is the file (or '-o') and `key` the dotted key concerned, when there is one.
    """

    def __init__(self, message, source=None, key=None):
        super().__init__(message)
        self.source = source
        self.key = key
