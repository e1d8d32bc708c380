"""The connection gate: who a CONNECT is, decided before any session is touched.

amqtt 0.12.1 deletes (clean session) or merges into (persistent session) the existing
session of a CONNECT's client id, and takes over a connected one, *before* it
authenticates: a wrong password with a victim's client id would wipe or kick the victim.
Admission (imcli/broker/admission.py, called by the adapter) therefore asks
``ConnectionGate.check`` right after reading the CONNECT, and refuses with its CONNACK code before any of that happens.

A CONNECT is accepted when the password verifies, the client id is ``<account>`` or
``<account>:<device>`` (or empty, then one is assigned), and a Last Will, if any, is on a
topic the account may publish to. Username ``register:<name>`` creates the account ``<name>``
with the given password when registration is open; ``register:<name>:<code>`` when it
needs an invite code (imcli/broker/invites.py); never when it is closed.

Before any password is checked, the throttles of imcli/broker/throttle.py decide whether
the attempt may be checked at all: past its free failures an (account, address), an account
or an address waits a doubling delay, and is refused meanwhile with CONNACK 3 (server
unavailable) without its password being looked at; a busy password checker refuses with
CONNACK 3 too. Registrations are limited per address and hour. A failed login is logged
with its account name and address, never its password (nor an invite code).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Mapping

from amqtt.session import Session

from imcli.broker.accounts import AccountStore, Role
from imcli.broker.acl import Access, TopicAcl
from imcli.broker.devices import DeviceStore
from imcli.broker.invites import InviteStore
from imcli.broker.limits import Limits
from imcli.broker.throttle import Busy, LoginThrottle, PasswordChecks, WindowCount, address_key
from imcli.core.errors import ImcliError, NameTaken
from imcli.core.names import look_alike
from imcli.core.rules import DEVICE_SUFFIX_SEPARATOR, REGISTER_PREFIX, client_id_of_device, parse_device_credential
from imcli.core.wire import client_id_account, is_name

log = logging.getLogger(__name__)

# MQTT 3.1.1 CONNACK return codes (section 3.2.2.3)
CONNECTION_ACCEPTED = 0
IDENTIFIER_REJECTED = 2
SERVER_UNAVAILABLE = 3  # throttled (too many failures or registrations) or too many password checks at once
BAD_USERNAME_PASSWORD = 4
NOT_AUTHORIZED = 5

AMQTT_RANDOM_ID = "amqtt/"  # amqtt.utils.gen_client_id's prefix for CONNECTs with an empty client id
# "open": anyone may register; "invite": with a code from `imcli admin invite`; "closed": the operator only
REGISTRATION_MODES = ("open", "invite", "closed")


def shown_username(username: str | None) -> str | None:
    """A CONNECT's username as logs may show it: an invite code (``register:<name>:<code>``) cut off."""
    if username and username.startswith(REGISTER_PREFIX) and ":" in username.removeprefix(REGISTER_PREFIX):
        return username[: username.index(":", len(REGISTER_PREFIX))] + ":…"
    return username


def bound_client_id(username: str, client_id: str | None, clean_session: bool | None) -> str | None:
    """The client id a login of ``username`` gets: its own if bound to the account, a fresh
    ``<username>:<random>`` if it sent none, ``None`` (refused) if it belongs to someone else."""
    if not client_id or (clean_session and client_id.startswith(AMQTT_RANDOM_ID)):
        # an empty client id (amqtt's decoder already replaced it with a random one)
        return f"{username}:{secrets.token_hex(6)}"
    if client_id_account(client_id) != username:
        return None
    return client_id


def will_allowed(acl: TopicAcl, username: str, role: Role, topic: str, retain: bool) -> bool:
    """Whether a Last Will may be registered at CONNECT (issue 15: it is not checked again when it fires)."""
    if not acl.allows(username, role, topic, Access.PUBLISH):
        return False
    return not retain or acl.may_retain(topic)


class ConnectionGate:
    """``acl`` checks a Last Will's topic at CONNECT (without group or friend records: issue 15)."""

    def __init__(
        self,
        store: AccountStore,
        acl: TopicAcl,
        registration: str,
        limits: Limits | None = None,
        clock: Callable[[], float] = time.monotonic,
        devices: DeviceStore | None = None,
        display_names: Callable[[], Mapping[str, str]] = dict,
    ) -> None:
        """``display_names``: every display name in use and its account (the presence records)."""
        if registration not in REGISTRATION_MODES:
            raise ValueError(f"registration must be one of {', '.join(REGISTRATION_MODES)}, not {registration!r}")
        limits = limits or Limits()
        self.store = store
        self.acl = acl
        self.registration = registration
        self.invites = InviteStore(store.data_dir)
        self.throttle = LoginThrottle(limits)
        self.registrations = WindowCount(limits.registrations_per_hour, 3600.0, limits.throttle_entries)
        self.checks = PasswordChecks(limits.password_checks, limits.password_queue)
        self.clock = clock
        self.devices = devices or DeviceStore(store.data_dir)
        self.display_names = display_names

    async def check(self, connect: Session) -> int:
        """The CONNACK return code this CONNECT (amqtt's ``Session`` as its decoder filled it in)
        deserves, 0 meaning accepted; on acceptance ``connect.client_id`` is the bound one."""
        username, password = connect.username, connect.password
        if not username or password is None:
            return NOT_AUTHORIZED  # anonymous
        if isinstance(password, bytes):
            try:
                password = password.decode("utf-8")
            except UnicodeDecodeError:
                return BAD_USERNAME_PASSWORD
        address = address_key(getattr(connect, "remote_address", None))
        if username.startswith(REGISTER_PREFIX):
            return await self._register(connect, username.removeprefix(REGISTER_PREFIX), password, address)

        if not is_name(username):  # no account has it: kept out of the per-account tables (their keys)
            return self._no_such_name(username, address)
        await self.store.refresh_off_loop()  # a changed accounts.json, parsed in a thread (issue 21)
        if (device_login := parse_device_credential(password)) is not None:
            return self._device_login(connect, username, *device_login, address)
        # a login verified before is recalled in the event loop, without a throttle: the workers'
        # service accounts (random 192-bit passwords) reconnect so even while their address is
        # throttled. A guess at theirs is throttled like any other (it costs argon2 all the same)
        account = self.store.recall(username, password, reload=False)
        trusted = account is not None and account.role is Role.SERVICE
        if not trusted and (left := self.throttle.wait(username, address, self.clock())) > 0:
            log.info("login refused for %r from %s: too many failed logins, %.0f s to wait", username, address, left)
            return SERVER_UNAVAILABLE
        if account is None:
            try:
                account = await self.checks.run(lambda: self.store.verify(username, password))
            except Busy:
                log.warning("login refused for %r from %s: too many password checks at once", username, address)
                return SERVER_UNAVAILABLE
        if account is None:
            delay = self.throttle.failed(username, address, self.clock())
            log.log(
                logging.WARNING if delay else logging.INFO,
                "login refused for %r from %s: unknown account or wrong password%s",
                username,
                address,
                f"; further attempts wait {delay:.0f} s" if delay else "",
            )
            return BAD_USERNAME_PASSWORD
        self.throttle.succeeded(username, address)
        client_id = bound_client_id(username, connect.client_id, connect.clean_session)
        if client_id is None:
            log.warning("login refused for %r: client id %r is not bound to it", username, connect.client_id)
            return IDENTIFIER_REJECTED
        connect.client_id = client_id
        will_topic, will_retain = connect.will_topic or "", bool(connect.will_retain)
        if connect.will_flag and not will_allowed(self.acl, username, account.role, will_topic, will_retain):
            log.warning("login refused for %r: Last Will on %r not allowed", username, connect.will_topic)
            return NOT_AUTHORIZED
        return CONNECTION_ACCEPTED

    def _device_login(self, connect: Session, username: str, device: str, secret: str, address: str) -> int:
        """A device credential (imcli/broker/devices.py): one keyed hash, in the event loop, no
        throttle (a 256-bit secret is not guessed; a refusal costs the same as an acceptance,
        and an attacker's refusals cannot delay the device's own logins). The accounts were reloaded
        just before, off the loop, if the file had changed."""
        account = self.store.snapshot().get(username)
        if (
            account is None
            or account.role is not Role.USER
            or not self.devices.verify(username, device, secret, account.created)
        ):
            log.info("login refused for %r from %s: unknown device or wrong device credential", username, address)
            return BAD_USERNAME_PASSWORD
        client_id = connect.client_id
        if not client_id or (connect.clean_session and client_id.startswith(AMQTT_RANDOM_ID)):
            client_id = f"{username}:{device}{DEVICE_SUFFIX_SEPARATOR}{secrets.token_hex(6)}"
        if not client_id_of_device(username, device, client_id):
            log.warning("login refused for %r: client id %r is not bound to its device %r", username, client_id, device)
            return IDENTIFIER_REJECTED
        connect.client_id = client_id
        will_topic, will_retain = connect.will_topic or "", bool(connect.will_retain)
        if connect.will_flag and not will_allowed(self.acl, username, account.role, will_topic, will_retain):
            log.warning("login refused for %r: Last Will on %r not allowed", username, connect.will_topic)
            return NOT_AUTHORIZED
        self.devices.seen(username, device)
        return CONNECTION_ACCEPTED

    def _no_such_name(self, username: str, address: str) -> int:
        """A login with a username no account can have (too long, upper case, odd characters):
        refused without a password check, and counted against its address alone, so that the
        throttle's tables never hold such a name (a 64 KB one per key) nor lock a real name."""
        now = self.clock()
        if (left := self.throttle.address_wait(address, now)) > 0:
            log.info("login refused for %.40r from %s: too many failures, %.0f s to wait", username, address, left)
            return SERVER_UNAVAILABLE
        self.throttle.address_failed(address, now)
        log.info("login refused for %.40r from %s: no such account name", username, address)
        return BAD_USERNAME_PASSWORD

    async def _register(self, connect: Session, request: str, password: str, address: str) -> int:
        name, _, code = request.partition(":")  # never log ``request``: it holds the invite code
        if self.registration == "closed":
            log.info("registration of %.40r refused: registration is closed", name)
            return NOT_AUTHORIZED
        # a registration is one clean connection: a persistent one kept a session of no account for 7 days
        if connect.client_id != REGISTER_PREFIX + name or connect.will_flag or not connect.clean_session:
            return IDENTIFIER_REJECTED
        now = self.clock()
        left = max(self.throttle.address_wait(address, now), self.registrations.wait(address, now))
        if left > 0:
            log.info("registration of %.40r from %s refused: too many from there, %.0f s to wait", name, address, left)
            return SERVER_UNAVAILABLE
        invite = code if self.registration == "invite" else None
        in_use = list(self.display_names())  # read in the event loop, which updates them
        try:
            refusal = await self.checks.run(lambda: self._create(name, password, invite, in_use))
        except Busy:
            log.warning("registration of %.40r from %s refused: too many password checks at once", name, address)
            return SERVER_UNAVAILABLE
        if refusal is not None:
            delay = self.throttle.address_failed(address, self.clock())
            log.log(
                logging.WARNING if delay else logging.INFO,
                "registration of %.40r from %s refused: %s%s",
                name,
                address,
                "no valid invite code" if refusal == NOT_AUTHORIZED else "name taken or invalid",
                f"; further attempts wait {delay:.0f} s" if delay else "",
            )
            return refusal
        self.registrations.add(address, self.clock())
        return CONNECTION_ACCEPTED

    def _create(self, name: str, password: str, invite: str | None, display_names: list[str]) -> int | None:
        """Make the account (in a worker thread: argon2, files); the CONNACK code of a refusal, or ``None``."""
        redeemed = None
        if invite is not None:
            redeemed = self.invites.redeem(invite) if invite else None
            if redeemed is None:
                return NOT_AUTHORIZED
        try:
            holder = look_alike(name, display_names)  # account names: AccountStore.add
            if holder is not None:
                raise NameTaken(f"the name {name!r} looks like the display name {holder!r}", "choose another name")
            self.store.add(name, password)
        except ImcliError as exc:
            log.info("registration of %.40r refused: %s", name, exc)
            if invite and redeemed is not None:
                self.invites.give_back(invite, redeemed)
            return BAD_USERNAME_PASSWORD
        return None
