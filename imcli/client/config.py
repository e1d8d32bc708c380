"""Where a signed-in user's logins live: ``$IMCLI_CONFIG_DIR/profile.json`` (mode 0600).

The file remembers several logins (issue 17), one per account, and which one is current
(``imcli switch``; ``--account NAME`` or IMCLI_ACCOUNT for one command). Each holds the
account, this machine's device name, the broker address (with TLS and its CA file, if used)
and the device credential the broker issued at login (``dc1:<device>:<secret>``,
imcli/broker/devices.py), never the account password, with one exception: a broker that
issues no device credentials (Mosquitto, NATS) needs the password on every CONNECT, and
the login says that it keeps it (``password_kept``).

A profile of an older imcli (one login, its password in plain text) is removed when it is
read, and the user is told to log in again.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from imcli.core.errors import ImcliError, NotLoggedIn
from imcli.core.text import quoted

if TYPE_CHECKING:  # imported where used: `imcli whoami` and `logout` need no MQTT
    from imcli.core.mqtt import BrokerAddress, Credentials

PROFILE_FILE = "profile.json"


def config_dir() -> Path:
    override = os.environ.get("IMCLI_CONFIG_DIR")
    if override:
        return Path(override)
    import platformdirs

    return platformdirs.user_config_path("imcli")


def default_data_dir() -> Path:
    override = os.environ.get("IMCLI_DATA_DIR")
    if override:
        return Path(override)
    import platformdirs

    return platformdirs.user_data_path("imcli") / "broker"


def default_workers_dir() -> Path:
    """Where ``imcli workers`` keeps its archive unless told: beside, never inside, the
    embedded broker's data, so a machine that runs both keeps two archives apart."""
    import platformdirs

    return platformdirs.user_data_path("imcli") / "workers"


def new_device_name() -> str:
    """``<hostname>-<4 hex>``: readable in ``who``, distinct per login."""
    host = re.sub(r"[^a-z0-9-]", "", socket.gethostname().lower().split(".")[0])[:24] or "device"
    if not host[0].isalnum():
        host = "d" + host
    return f"{host}-{secrets.token_hex(2)}"


@dataclass(frozen=True)
class Profile:
    account: str
    credential: str = field(repr=False)  # the device credential (or the password: ``password_kept``)
    host: str  # or the nodes of a cluster, "a:1883,b:1883,c:1883" (BrokerAddress.hosts)
    port: int
    device: str
    tls: bool = False
    ca: str | None = None  # absolute path of the CA file given at login
    password_kept: bool = False  # a broker without device credentials: the password itself

    @property
    def address(self) -> BrokerAddress:
        from imcli.core.mqtt import BrokerAddress

        return BrokerAddress.of(self.host, self.port, self.tls, self.ca)

    @property
    def credentials(self) -> Credentials:
        from imcli.core.mqtt import Credentials

        return Credentials(self.account, self.credential)


@dataclass
class Logins:
    current: str | None
    profiles: dict[str, Profile]


def profile_path() -> Path:
    return config_dir() / PROFILE_FILE


_FIELDS = ("account", "credential", "host", "port", "device")
_OPTIONAL = ("tls", "ca", "password_kept")


def load_logins() -> Logins:
    """Every remembered login; an old profile (with a password) is removed and reported."""
    path = profile_path()
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return Logins(None, {})
    except ValueError as exc:
        raise ImcliError(f"the profile {path} is damaged", "run 'imcli login NAME' again") from exc
    if isinstance(raw, dict) and "version" not in raw and "password" in raw:
        path.unlink()  # its password must not stay on disk
        raise NotLoggedIn(
            f"the profile {path} was from an older imcli and held your password in plain text: it is removed",
            "run 'imcli login NAME' again: the password is traded for a device credential",
        )
    try:
        profiles = {
            name: Profile(**{k: entry[k] for k in _FIELDS}, **{k: entry[k] for k in _OPTIONAL if k in entry})
            for name, entry in raw["logins"].items()
        }
        current = raw.get("current")
        return Logins(current if current in profiles else None, profiles)
    except (KeyError, TypeError, AttributeError) as exc:
        raise ImcliError(f"the profile {path} is damaged", "run 'imcli login NAME' again") from exc


def save_logins(logins: Logins) -> Path:
    directory = config_dir()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / PROFILE_FILE
    doc = {"version": 2, "current": logins.current, "logins": {n: asdict(p) for n, p in logins.profiles.items()}}
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(doc, fh, indent=1)
    os.chmod(tmp, 0o600)  # O_CREAT's mode is ignored when the file existed
    os.replace(tmp, path)
    return path


_chosen: list[str | None] = []  # set by the Typer app for each command it runs


def choose_account(account: str | None) -> None:
    """``--account NAME`` (Typer reads IMCLI_ACCOUNT into it) for the command being run."""
    _chosen[:] = [account]


def chosen_account() -> str | None:
    """The account ``--account`` (or IMCLI_ACCOUNT, for ``imcli say``'s fast path) names, if any."""
    if _chosen:
        return _chosen[0]
    return os.environ.get("IMCLI_ACCOUNT") or None


def load_profile(account: str | None = None) -> Profile:
    """The login of ``account`` (else ``--account``/IMCLI_ACCOUNT, else the current one)."""
    logins = load_logins()
    name = account or chosen_account() or logins.current
    if name is None or not logins.profiles:
        raise NotLoggedIn("not logged in", "run 'imcli login NAME' or 'imcli register NAME'")
    if name not in logins.profiles:
        known = ", ".join(sorted(logins.profiles)) or "none"
        raise NotLoggedIn(f"not logged in as {quoted(name)} (logged in: {known})", _login_hint(name))
    return logins.profiles[name]


def _login_hint(name: str) -> str:
    """What to run for a login that is not here: the name itself only if it is one (a typed --account
    of 100 kB or with escapes is not repeated whole in the error line; the message quotes it cut)."""
    from imcli.core.topics import is_name

    return f"run 'imcli login {name if is_name(name) else 'NAME'}'"


def save_profile(profile: Profile) -> Path:
    """Remember ``profile`` (replacing the same account's) and make it the current login."""
    try:
        logins = load_logins()
    except NotLoggedIn:
        logins = Logins(None, {})
    logins.profiles[profile.account] = profile
    logins.current = profile.account
    return save_logins(logins)


def switch_profile(account: str) -> Profile:
    logins = load_logins()
    if account not in logins.profiles:
        known = ", ".join(sorted(logins.profiles)) or "none"
        raise NotLoggedIn(f"not logged in as {quoted(account)} (logged in: {known})", _login_hint(account))
    logins.current = account
    save_logins(logins)
    return logins.profiles[account]


def delete_profile(account: str | None = None) -> Profile:
    """Forget one login (``account``, else the chosen or current one); another becomes current."""
    profile = load_profile(account)
    logins = load_logins()
    del logins.profiles[profile.account]
    if logins.current == profile.account or logins.current is None:
        logins.current = min(logins.profiles, default=None)
    if logins.profiles:
        save_logins(logins)
    else:
        profile_path().unlink()
    return profile
