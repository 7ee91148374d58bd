"""coderay's domain errors: what went wrong in coderay's own terms, never in HTTP's.

The CLI turns them into a message and exit status 2; `deployments` maps each kind to an HTTP status. Every
message says what is wrong and what to do about it.
"""

from __future__ import annotations

__all__ = [
    "CoderayError",
    "ConfigError",
    "UnknownServiceError",
    "InvalidRouteError",
    "NotTrainedError",
    "NotSearchedError",
    "ClusterAuthError",
    "PortInUseError",
]


class CoderayError(Exception):
    """Base of every error coderay raises on purpose."""

    @property
    def reason(self) -> str:
        return str(self)


class ConfigError(CoderayError, ValueError):
    """A config file that cannot be used; the message names the file and the field."""


class UnknownServiceError(CoderayError, KeyError):
    """A service name the config does not define."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class InvalidRouteError(CoderayError, ValueError):
    """A path a service cannot run: not a path id, not in the reward table, untrained, or no host quota."""


class NotTrainedError(CoderayError, FileNotFoundError):
    """A service whose model has not been trained yet (serving and search workers never train)."""


class NotSearchedError(CoderayError, FileNotFoundError):
    """No reward table for this config yet (serving never searches)."""


class ClusterAuthError(CoderayError, ConnectionError):
    """A Ray cluster that refused this driver: token authentication is on and this process has no (or the
    wrong) token."""


class PortInUseError(CoderayError):
    """The HTTP port is held by another process (Serve's HAProxy would crash at start-up with a long trace)."""
