"""Replies that others grow: ``group list``, ``who`` and ``profile_get`` come in pages, and what others
can put in a friends record or make one join is bounded (docs/SECURITY.md, "Brokers and workers").

Mosquitto applies its ``message_size_limit`` to the workers' replies too and drops a larger one
without a word: the asker waits for its timeout. Other accounts grew a victim's ``group list`` (the
groups they put him in, everyone's public groups) and ``who`` (everyone online, each with up to 200
device names) past it. The workers now cut such a reply to the broker's limit (``ServiceWorker.fit``,
``imcli workers --max-payload``) and say ``more``; the clients follow the pages to the end.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from imcli.client import pages, services
from imcli.client.identity import Identity
from imcli.core.errors import ImcliError
from imcli.core.wire import (
    ABOUT_MAX,
    DeviceStatus,
    ErrorReply,
    FriendReply,
    FriendRequest,
    Friends,
    GroupInfo,
    GroupList,
    GroupReply,
    GroupRequest,
    Payload,
    Presence,
    Profile,
    ProfileGet,
    ProfileList,
    ProfileSet,
    Roster,
    Topics,
    WhoRequest,
    WireModel,
    decode,
    encode,
)
from imcli.groups.book import GroupBook, fit_groups
from imcli.groups.friends import MAX_FRIENDS, MAX_PENDING, FriendBook
from imcli.presence.roster import MAX_STATUSES
from imcli.presence.worker import PresenceWorker
from imcli.serve.host import ServeInfo
from tests import brokers
from tests.browser import chromium, new_user, require_chromium
from tests.conftest import Cli, Raw, ident, password_of
from tests.rawmqtt import connect_raw, wait_until

broker_kind, broker_under_test, server, users = brokers.ALL

T = Topics()
LONG = "m" * 28  # 32-character account names: the longest there are
STATUS_FLOODERS = ("carol", "dave", "erin", "frank")  # each with MAX_STATUSES devices of 48-character names
SMALL_LIMIT = 32 * 1024  # this module's Mosquitto: message_size_limit and --max-payload (default: 256 KiB)


def ask(client: Raw, me: str, request: WireModel, timeout: float = 30.0) -> Payload:
    """``request`` from ``client``'s raw connection (subscribed to ``me``'s replies); its reply, decoded."""
    corr = str(getattr(request, "id"))  # noqa: B009
    client.publish(T.request(me, corr), encode(request))
    message = client.expect(T.reply(me, corr), timeout)
    return decode(bytes(message.payload))


def asker(client: Raw, me: str) -> Callable[[WireModel], Payload]:
    return lambda request: ask(client, me, request)


# ---------------------------------------------------------------- pages on every broker


def test_group_list_and_who_come_in_pages_that_a_raw_client_follows(
    server: ServeInfo, users: Callable[..., None], raw: Callable[..., Raw]
) -> None:
    """alice is in two groups and may join a third; a raw client asks one group, then one user, a page:
    each page says ``more`` until the last, the next starts after the last name, and the pages hold
    every group and every user once. ``pages.all_groups`` and ``pages.all_users`` (the CLI's and
    ``imcli chat``'s) get the same from the same raw connection."""
    users("alice", "bob", "carol")
    alice, bob = ident(server, "alice"), ident(server, "bob")
    services.group_request(alice, "create", "aa-mine")
    services.group_request(bob, "create", "bb-open")
    services.group_request(bob, "create", "cc-with-alice", private=True)
    services.group_request(bob, "invite", "cc-with-alice", user="alice")
    client = raw("alice", client_id="alice:pages")
    assert client.subscribe(T.reply_filter("alice")) == 1

    seen: list[tuple[str, bool, bool]] = []  # (group, mine, more)
    after = None
    while True:
        page = ask(client, "alice", GroupRequest(op="list", after=after, limit=1))
        assert isinstance(page, GroupList)
        groups = [(g.name, True) for g in page.mine] + [(g.name, False) for g in page.public]
        assert len(groups) <= 1
        seen += [(name, mine, page.more) for name, mine in groups]
        if not page.more:
            break
        after = groups[0][0]
    mine = {name for name, is_mine, _ in seen if is_mine}
    assert [name for name, _, _ in seen] == ["aa-mine", "bb-open", "cc-with-alice"], seen
    assert mine == {"aa-mine", "cc-with-alice"} and [more for *_, more in seen] == [True, True, False]
    every = pages.all_groups(asker(client, "alice"))
    assert isinstance(every, GroupList) and not every.more
    assert [g.name for g in every.mine] == ["aa-mine", "cc-with-alice"] and [g.name for g in every.public] == [
        "bb-open"
    ]

    who = ask(client, "alice", WhoRequest(all=True, limit=1))
    assert isinstance(who, Roster) and len(who.users) == 1 and who.more
    everyone = pages.all_users(asker(client, "alice"), include_offline=True)
    assert isinstance(everyone, Roster)
    assert {"alice", "bob", "carol"} <= {u.account for u in everyone.users}
    assert len({u.account for u in everyone.users}) == len(everyone.users)


# ---------------------------------------------------------------- Mosquitto's limit, reached by others


@pytest.fixture
def small_mosquitto(tmp_path: Path) -> Iterator[brokers.Mosquitto]:
    """Mosquitto with ``message_size_limit`` SMALL_LIMIT, its workers given the same ``--max-payload``
    (the mechanism is the one at 256 KiB; the test reaches it in seconds instead of minutes)."""
    if not brokers.mosquitto_available():
        pytest.skip(brokers.NOT_INSTALLED)
    extra = f"message_size_limit {SMALL_LIMIT}\n"
    with (
        brokers.running_mosquitto(tmp_path / "mosquitto", extra=extra) as mosquitto,
        brokers.running_workers(mosquitto, archive=False, files=False, limit=SMALL_LIMIT),
    ):
        yield mosquitto


def _accounts_named_only(mosquitto: brokers.Mosquitto, names: list[str]) -> None:
    """Accounts the group worker knows (its directory is the password file): lines with alice's hash,
    as mosquitto_passwd writes them, without a reload (none of them logs in)."""
    lines = mosquitto.passwd.read_text().splitlines()
    digest = next(line.split(":", 1)[1] for line in lines if line.startswith("alice:"))
    with mosquitto.passwd.open("a") as f:
        f.writelines(f"{name}:{digest}\n" for name in names)


def _raw(mosquitto: brokers.Mosquitto, name: str, device: str) -> Raw:
    client = connect_raw("127.0.0.1", mosquitto.port, name, f"{name}:{device}", password_of(name))
    assert client.rc == 0
    assert client.subscribe(T.reply_filter(name)) == 1
    return client


@pytest.mark.slow
def test_others_cannot_silence_a_victims_group_list_or_who_on_mosquitto(
    small_mosquitto: brokers.Mosquitto, tmp_path: Path
) -> None:
    """carol, a stranger to bob, creates public groups, adds bob to each (an invite needs no consent),
    and in each invites then removes 200 accounts of 32-character names: every record keeps the 200
    removed (``MAX_REMOVED``), so the records bob's ``group list`` holds pass the broker's limit.
    carol, dave and erin each retain 200 statuses of 48-character device names, which ``who`` lists.
    Mosquitto dropped both replies, so bob's ``imcli group list`` and ``imcli who`` said the worker did
    not answer; now they list everything, in pages."""
    mosquitto = small_mosquitto
    for name in ("erin", "frank"):
        mosquitto.add_account(name)
    removed = [f"{LONG}{i:04d}" for i in range(200)]
    _accounts_named_only(mosquitto, removed)
    groups = [f"{'g' * 28}{i:04d}" for i in range(SMALL_LIMIT // 7000 + 1)]  # a record is about 7.3 KB

    carol = _raw(mosquitto, "carol", "asks")
    _grow_groups(mosquitto, carol, "carol", groups, "bob", removed)
    status = encode(DeviceStatus(interval=3600))  # an hour: none expires during the test
    for name in STATUS_FLOODERS:
        devices = _raw(mosquitto, name, "devices")
        for i in range(MAX_STATUSES - 1):
            devices.client.publish(T.status(name, f"{'d' * 44}{i:04d}"), status, qos=1, retain=True)
        devices.publish(T.status(name, "last"), status, retain=True)

    bob = ident(mosquitto.info(), "bob")
    listed = services.group_request(bob, "list")  # without the pages: RequestTimeout (Mosquitto dropped it)
    assert isinstance(listed, GroupList)
    assert sorted(g.name for g in listed.mine) == groups and not listed.more
    assert sum(len(encode(g)) for g in listed.mine) > SMALL_LIMIT  # more than one reply could hold
    cli = Cli(CliRunner(), mosquitto.info(), tmp_path / "config-bob")
    cli.login("bob")
    shown = cli("group", "list", "--json")
    assert shown.exit_code == 0, shown.output
    assert sorted(g["name"] for g in json.loads(shown.stdout)["mine"]) == groups

    full = dict.fromkeys(STATUS_FLOODERS, MAX_STATUSES)
    assert wait_until(lambda: _devices(bob) == full, 60)  # without the pages: RequestTimeout
    who = cli("who", "--json")
    assert who.exit_code == 0, who.output
    listed_users = {u["account"]: len(u["device_names"]) for u in json.loads(who.stdout)}
    assert {a: n for a, n in listed_users.items() if a in full} == full
    carol.close()


@pytest.mark.slow
def test_friends_large_profiles_do_not_silence_a_friend_list_on_mosquitto(
    small_mosquitto: brokers.Mosquitto, tmp_path: Path
) -> None:
    """Nine friends of bob's, each with an "about" of 1,000 four-byte characters (raw clients): the one
    ``profile_get`` of ``friend list`` passed the broker's limit and Mosquitto dropped it, and ``friend
    list`` showed every friend without a signature as if none had one (it takes a timeout there as no
    presence worker). Now the reply says ``more`` and the client asks for the rest."""
    mosquitto = small_mosquitto
    friends = [f"p{i}" for i in range(9)]
    bob = ident(mosquitto.info(), "bob")
    for name in friends:
        mosquitto.add_account(name)
        client = _raw(mosquitto, name, "profile")
        profile = ProfileSet(signature=f"sig of {name}", about="😀" * ABOUT_MAX)
        assert isinstance(ask(client, name, profile), ProfileList)
        assert not isinstance(ask(client, name, FriendRequest(op="add", user="bob")), ErrorReply)
        client.close()
        services.friend_request(bob, "accept", name)
    cli = Cli(CliRunner(), mosquitto.info(), tmp_path / "config-bob")
    cli.login("bob")
    shown = cli("friend", "list", "--json")
    assert shown.exit_code == 0, shown.output
    rows = json.loads(shown.stdout)["friends"]
    assert {r["account"]: r["signature"] for r in rows} == {name: f"sig of {name}" for name in friends}


def _grow_groups(
    mosquitto: brokers.Mosquitto, asker: Raw, owner: str, groups: list[str], guest: str, removed: list[str]
) -> None:
    """``owner`` creates ``groups``, adds ``guest`` to each and in each invites then removes every one of
    ``removed`` (pipelined on a second connection), and waits until the worker has done it all."""
    flood = connect_raw("127.0.0.1", mosquitto.port, owner, f"{owner}:flood", password_of(owner))
    for group in groups:
        assert not isinstance(ask(asker, owner, GroupRequest(op="create", group=group)), ErrorReply)
        requests = [GroupRequest(op="invite", group=group, user=guest)]
        for name in removed:
            requests += [GroupRequest(op=op, group=group, user=name) for op in ("invite", "kick")]
        for request in requests:  # pipelined: the worker answers them in order
            flood.client.publish(T.request(owner, request.id), encode(request), qos=1)

    def done() -> bool:  # the last group's last kick done: the worker answers the owner in order
        last = ask(asker, owner, GroupRequest(op="members", group=groups[-1]))
        assert isinstance(last, GroupReply) and last.group is not None
        return last.group.members == [owner, guest] and len(last.group.removed or ()) == len(removed)

    assert wait_until(done, 120)
    flood.close()


@pytest.mark.slow
def test_the_web_client_lists_every_page_of_groups(tmp_path: Path) -> None:
    """The same groups as above, seen by alice's web client on Mosquitto as public groups she may join
    (which only the group list tells): it follows the pages (without the fit the list went unanswered,
    without its pages it showed the first page as if it were all)."""
    require_chromium()
    if not brokers.mosquitto_available():
        pytest.skip(brokers.NOT_INSTALLED)
    extra = f"message_size_limit {SMALL_LIMIT}\n"
    with (
        brokers.running_mosquitto(tmp_path / "mosquitto", extra=extra, ws=True) as mosquitto,
        brokers.running_workers(mosquitto, files=False, limit=SMALL_LIMIT),
    ):
        removed = [f"{LONG}{i:04d}" for i in range(200)]
        _accounts_named_only(mosquitto, removed)
        groups = [f"{'g' * 28}{i:04d}" for i in range(SMALL_LIMIT // 7000 + 1)]
        carol = _raw(mosquitto, "carol", "asks")
        _grow_groups(mosquitto, carol, "carol", groups, "bob", removed)
        with chromium() as browser:
            alice = new_user(browser, f"http://127.0.0.1:{mosquitto.ws_port}/", "alice")
            alice.sign_in(password_of("alice"))
            alice.p.wait_for_function(
                "n => document.querySelectorAll('#public-groups li').length >= n", arg=len(groups)
            )
            shown = alice.p.eval_on_selector_all("#public-groups li", "els => els.map(e => e.textContent)")
            assert all(any(f"#{g}" in line for line in shown) for g in groups), shown
            assert alice.errors == []
        carol.close()


def _devices(bob: Identity) -> dict[str, int]:
    return {p.account: p.devices for p in services.who(bob) if p.account in STATUS_FLOODERS}


# ---------------------------------------------------------------- what others can impose, bounded


def test_others_may_put_one_account_in_a_bounded_number_of_groups() -> None:
    """An invite needs no consent: carol could add bob to every group of hers and her friends'. Past
    ``max_memberships`` groups, an invite of bob is refused with why; his own join still works."""
    book = GroupBook(max_owned=10, creations_per_minute=100, max_memberships=3)
    for i in range(4):
        assert not isinstance(book.apply("carol", GroupRequest(op="create", group=f"c{i}"), 0).reply, ErrorReply)
    for i in range(3):
        assert not isinstance(
            book.apply("carol", GroupRequest(op="invite", group=f"c{i}", user="bob"), 0).reply, ErrorReply
        )
    refused = book.apply("carol", GroupRequest(op="invite", group="c3", user="bob"), 0).reply
    assert isinstance(refused, ErrorReply) and refused.code == "denied"
    assert refused.text == "bob is in 3 groups already: ask them to join #c3 themselves"
    assert not isinstance(book.apply("bob", GroupRequest(op="join", group="c3"), 0).reply, ErrorReply)


def test_a_friends_record_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each ``add`` from another account grew bob's retained record (and every friend reply) without
    bound, towards the payload limit past which Mosquitto drops it. Waiting requests are bounded each
    way, and friends too, each refusal saying why."""
    monkeypatch.setattr("imcli.groups.friends.MAX_PENDING", 2)
    monkeypatch.setattr("imcli.groups.friends.MAX_FRIENDS", 1)
    book = FriendBook()
    for asker in ("carol", "dave"):
        assert not isinstance(book.apply(asker, FriendRequest(op="add", user="bob")).reply, ErrorReply)
    refused = book.apply("erin", FriendRequest(op="add", user="bob")).reply
    assert isinstance(refused, ErrorReply) and refused.text == "bob has 2 friend requests waiting already"
    for asked in ("x1", "x2"):
        book.apply("erin", FriendRequest(op="add", user=asked))
    refused = book.apply("erin", FriendRequest(op="add", user="x3")).reply
    assert isinstance(refused, ErrorReply) and refused.text == "2 of your friend requests wait for an answer already"
    assert not isinstance(book.apply("bob", FriendRequest(op="accept", user="carol")).reply, ErrorReply)
    refused = book.apply("bob", FriendRequest(op="accept", user="dave")).reply
    assert isinstance(refused, ErrorReply) and refused.text == "you have 1 friends already"
    assert book.record("bob").incoming == ["dave"] and book.record("bob").friends == ["carol"]


def test_the_default_bounds_keep_a_friends_record_under_mosquittos_limit() -> None:
    """2,000 friends and 500 waiting each way, of 32-character names: one reply Mosquitto carries."""
    names = [f"{LONG}{i:04d}" for i in range(MAX_FRIENDS + 2 * MAX_PENDING)]
    record = Friends(
        account=LONG,
        friends=names[:MAX_FRIENDS],
        incoming=names[MAX_FRIENDS : MAX_FRIENDS + MAX_PENDING],
        outgoing=names[MAX_FRIENDS + MAX_PENDING :],
    )
    assert len(encode(FriendReply(id="x" * 32, record=record))) < brokers.LIMIT


# ---------------------------------------------------------------- fit, and the clients' pages


def _group(name: str, members: int) -> GroupInfo:
    people = [f"{LONG}{i:04d}" for i in range(members)]
    return GroupInfo(name=name, owner=people[0], admins=people[:1], members=people, created=0)


def test_a_group_list_is_fitted_by_name_and_keeps_which_are_mine() -> None:
    mine, public = [_group("a", 100), _group("c", 100)], [_group("b", 100), _group("d", 100)]
    reply = GroupList(id="r", mine=mine, public=public)
    limit = len(encode(GroupList(id="r", mine=mine[:1], public=public[:1], more=True)))
    cut = fit_groups(reply, limit)
    assert ([g.name for g in cut.mine], [g.name for g in cut.public], cut.more) == (["a"], ["b"], True)
    alone = fit_groups(reply, 10)  # one record too large alone goes as it is
    assert ([g.name for g in alone.mine], alone.public, alone.more) == (["a"], [], True)


def test_who_and_profiles_are_fitted_with_more() -> None:
    worker = PresenceWorker.__new__(PresenceWorker)  # fit uses nothing of a connected worker
    users = [Presence(account=f"u{i}", nick=f"u{i}", state="online", since=0) for i in range(50)]
    roster = worker.fit(Roster(id="r", users=users), 1000)
    assert isinstance(roster, Roster) and roster.more and 0 < len(roster.users) < 50
    assert len(encode(roster)) <= 1000 and roster.users == users[: len(roster.users)]
    profiles = [Profile(account=f"u{i}", name=f"u{i}", about="x" * 900) for i in range(5)]
    listed = worker.fit(ProfileList(id="r", profiles=profiles), 2500)
    assert isinstance(listed, ProfileList) and listed.more and len(listed.profiles) == 2


def test_the_clients_follow_every_page_and_refuse_a_page_that_brings_nothing() -> None:
    """``pages``: the profiles a page left out are asked again; a page that says ``more`` but brings
    nothing new is an error, never a list shown as if whole."""
    asked: list[list[str]] = []

    def profiles(request: WireModel) -> Payload:
        assert isinstance(request, ProfileGet)
        asked.append(list(request.users))
        known = [u for u in request.users if u != "ghost"]
        return ProfileList(id=request.id, profiles=[Profile(account=u, name=u) for u in known[:2]], more=len(known) > 2)

    got = pages.all_profiles(profiles, ["a", "ghost", "b", "c", "d"])
    assert isinstance(got, ProfileList) and [p.account for p in got.profiles] == ["a", "b", "c", "d"]
    assert asked == [["a", "ghost", "b", "c", "d"], ["c", "d"]]

    def stuck(request: WireModel) -> Payload:
        assert isinstance(request, GroupRequest | WhoRequest)
        if isinstance(request, WhoRequest):
            return Roster(id=request.id, users=[], more=True)
        return GroupList(id=request.id, mine=[_group("a", 1)], public=[], more=True)

    with pytest.raises(ImcliError, match="stopped in the middle"):
        pages.all_groups(stuck)
    with pytest.raises(ImcliError, match="stopped in the middle"):
        pages.all_users(stuck, include_offline=False)
