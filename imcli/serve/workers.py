"""The embedded default's four workers (presence, groups, archive, files) and the account view
they share, built the same way in the workers' child process and in ``BackgroundServer``'s
threads."""

from __future__ import annotations

from pathlib import Path

from imcli.archive.worker import ArchiveWorker
from imcli.broker.accounts import AccountStore, Role
from imcli.broker.limits import Limits
from imcli.core.mqtt import BrokerAddress, Credentials
from imcli.core.rules import ARCHIVE_ACCOUNT, FILES_ACCOUNT, GROUPS_ACCOUNT, PRESENCE_ACCOUNT
from imcli.core.service import ServiceWorker
from imcli.core.wire import DEFAULT_MAX_PAYLOAD, Topics
from imcli.files.worker import FileLimits, FilesWorker
from imcli.groups.worker import GroupWorker
from imcli.moments.worker import MomentsWorker
from imcli.presence.worker import PresenceWorker


class StoreDirectory:
    """The presence worker's view of the embedded broker's accounts."""

    def __init__(self, store: AccountStore) -> None:
        self._store = store

    def is_user(self, name: str) -> bool:
        account = self._store.get(name)
        return account is not None and account.role is Role.USER

    def user_names(self) -> frozenset[str]:
        return frozenset(a.name for a in self._store.list_accounts() if a.role is Role.USER)


def embedded_workers(
    local: BrokerAddress,
    passwords: dict[str, str],
    directory: StoreDirectory,
    data_dir: Path,
    topics: Topics,
    history_days: float | None,
    limits: Limits | None = None,
    max_payload: int = DEFAULT_MAX_PAYLOAD,
) -> list[ServiceWorker]:
    """The presence, group and archive workers of the embedded default, not yet started
    (in threads beside the broker, or in imcli/serve/child.py's process); ``limits`` are
    imcli serve's, of which the group worker takes ``max_groups`` and ``group_rate``, the files
    worker ``max_file``, ``file_quota``, ``max_uploads`` and ``max_chunk`` (its chunks' size)."""
    limits = limits or Limits()

    def creds(account: str) -> Credentials:
        return Credentials(account, passwords[account])

    return [
        PresenceWorker(local, creds(PRESENCE_ACCOUNT), directory, topics, "embedded"),
        GroupWorker(
            local,
            creds(GROUPS_ACCOUNT),
            directory,
            topics,
            "embedded",
            max_groups=limits.max_groups,
            group_rate=limits.group_rate,
        ),
        ArchiveWorker(
            local,
            creds(ARCHIVE_ACCOUNT),
            data_dir,
            topics,
            "embedded",
            retention_days=history_days,
            store_messages=False,  # the broker journals each message before its PUBACK
        ),
        FilesWorker(
            local,
            creds(FILES_ACCOUNT),
            data_dir,
            topics,
            "embedded",
            limits=FileLimits(
                limits.max_file,
                limits.file_quota,
                limits.max_uploads,
                max_payload,
                limits.max_chunk,
                in_flight=limits.output_close // 2,
            ),
        ),
        # under the group worker's account (it needs exactly its rights), on a device of its own
        MomentsWorker(local, creds(GROUPS_ACCOUNT), data_dir, topics, "embedded-moments"),
    ]
