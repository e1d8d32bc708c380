"""Every error imcli expects, under one root.

    ImcliError                      one line for the user: "<what happened> (<what to do>)"
     ├── InvalidInput               a name, text or option the user typed is not acceptable
     ├── NotLoggedIn                no profile in the config directory
     ├── AccountError               registration or account administration refused
     │    └── NameTaken
     ├── NotFound                   unknown recipient, unknown account or group
     ├── NotAllowed                 a worker refused: not an admin, a private group
     └── BrokerError                anything on the way to and from the broker
          ├── BrokerUnreachable     TCP connect failed / broker went away
          ├── AuthenticationFailed  CONNACK 4/5: wrong name or password, client id refused
          │    └── DeviceLoggedOut  this device's credential was revoked (logout, devices revoke)
          ├── SessionTakenOver      another client took this device's session (same client id)
          ├── PublishFailed         no PUBACK, subscription refused
          ├── RateLimited           the broker dropped a request (or a file's chunk): the account's rate
          └── RequestTimeout        no worker answered a request

The CLI catches ``ImcliError`` once and prints ``Error: <message>`` on stderr with exit code 1.
Lower layers (paho, OS errors) are translated at the boundary with ``raise ... from exc``.
"""

from __future__ import annotations


class ImcliError(Exception):
    """Root of every expected failure; ``str(err)`` is the line shown to the user.

    The hint (what to do) is required: every expected failure tells the user a way on.
    """

    def __init__(self, message: str, hint: str) -> None:
        self.message = message
        self.hint = hint
        super().__init__(f"{message} ({hint})")


class InvalidInput(ImcliError):
    """A name, text or option is not acceptable."""


class NotLoggedIn(ImcliError):
    """No stored profile."""


class AccountError(ImcliError):
    """Registration or administration of an account was refused."""


class NameTaken(AccountError):
    """The account name exists already."""


class NotFound(ImcliError):
    """A name that should exist does not."""


class NotAllowed(ImcliError):
    """A worker refused the request for this user (not an admin, private group, …)."""


class BrokerError(ImcliError):
    """Something between us and the broker failed."""


class BrokerUnreachable(BrokerError):
    """No TCP connection to the broker."""


class AuthenticationFailed(BrokerError):
    """The broker refused the CONNECT; ``code`` is the MQTT 3.1.1 CONNACK return code."""

    def __init__(self, message: str, hint: str, *, code: int = 5) -> None:
        super().__init__(message, hint)
        self.code = code


class PublishFailed(BrokerError):
    """A publish or subscribe was not acknowledged."""


class RateLimited(BrokerError):
    """The broker dropped a request beyond the account's publish rate, or part of a file transfer
    beyond its file-transfer rate, and said so (its ``rate`` notice): no worker will answer, so
    the asker fails at once instead of timing out. ``retry``: seconds until the broker accepts
    again, as the notice said (``None``: it did not say)."""

    def __init__(self, message: str, hint: str, *, retry: float | None = None) -> None:
        super().__init__(message, hint)
        self.retry = retry


class RequestTimeout(BrokerError):
    """No worker answered a request in time."""


class DeviceLoggedOut(AuthenticationFailed):
    """This device was logged out or revoked while a client ran (issue 17)."""

    def __init__(self, device: str) -> None:
        super().__init__(
            f"this device ({device}) was logged out: its credential was revoked",
            "log in again with 'imcli login NAME'",
            code=4,
        )


class SessionTakenOver(BrokerError):
    """Another client connected with this client's id and took its session (MQTT-3.1.4-2): the
    embedded broker said so (a ``taken_over`` notice), or, on a broker that cannot, the connection
    was closed again and again right after it came back (``probably``). Reconnecting would take the
    session back and lose it again a second later, each of the two missing messages in turn."""

    def __init__(self, device: str, *, probably: bool = False) -> None:
        what = (
            f"this device's connection was closed again each time it came back: another imcli probably "
            f"uses this device ('{device}'); stopped"
            if probably
            else f"this device's session was taken over by another imcli (device '{device}'); stopped"
        )
        super().__init__(
            what,
            "stop the other one; a profile copied to another machine shares its device: "
            "run 'imcli login NAME' there for a device of its own",
        )
