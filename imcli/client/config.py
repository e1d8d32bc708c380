"""Where a signed-in user's profile lives: ``$IMCLI_CONFIG_DIR/profile.json`` (mode 0600).

The profile holds the account, its password (MQTT needs it on every CONNECT, as
Mosquitto's own clients do), the broker address (with TLS and its CA file, if used) and
this machine's device name.
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
    password: str = field(repr=False)
    host: str  # or the nodes of a cluster, "a:1883,b:1883,c:1883" (BrokerAddress.hosts)
    port: int
    device: str
    tls: bool = False
    ca: str | None = None  # absolute path of the CA file given at login

    @property
    def address(self) -> BrokerAddress:
        from imcli.core.mqtt import BrokerAddress

        return BrokerAddress.of(self.host, self.port, self.tls, self.ca)

    @property
    def credentials(self) -> Credentials:
        from imcli.core.mqtt import Credentials

        return Credentials(self.account, self.password)


def profile_path() -> Path:
    return config_dir() / PROFILE_FILE


def load_profile() -> Profile:
    path = profile_path()
    try:
        raw = json.loads(path.read_text())
        optional = {k: raw[k] for k in ("tls", "ca") if k in raw}  # profiles saved before TLS lack them
        return Profile(**{k: raw[k] for k in ("account", "password", "host", "port", "device")}, **optional)
    except FileNotFoundError:
        raise NotLoggedIn("not logged in", "run 'imcli login NAME' or 'imcli register NAME'") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ImcliError(f"the profile {path} is damaged", "run 'imcli login NAME' again") from exc


def save_profile(profile: Profile) -> Path:
    directory = config_dir()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / PROFILE_FILE
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(asdict(profile), fh, indent=1)
    os.chmod(tmp, 0o600)  # O_CREAT's mode is ignored when the file existed
    os.replace(tmp, path)
    return path


def delete_profile() -> Profile:
    profile = load_profile()
    profile_path().unlink()
    return profile
