"""Display names in any script (张三, José, Ελένη, Ана), and the key that keeps them apart.

A display name (what ``rename`` and ``profile set --name`` set; once called a nickname) may
be written in any script. Two names are the *same name* when they share a ``name_keys`` key:
a key is the name's Unicode TR39 skeleton after NFKC normalisation and case folding, so
``\\u0430lice`` (with a Cyrillic a), ``ALICE``, ``\\uff41lice`` (a full-width a) and ``a1ice`` are all
``alice`` and cannot be taken by anyone but the account ``alice``. The presence worker keeps
names unique under this key, among display names and account names alike.

The confusables data is Unicode's own ``confusables.txt``, as shipped (and kept current) by
the ``confusable_homoglyphs`` package; it lists, for each character, the characters it can
be mistaken for. ``name_keys`` maps every character to one representative of its class (the
classes are the connected groups of that list, so ``l``, ``1``, ``I`` and ``|`` are one
class: a little stricter than TR39's own prototype mapping, never looser). Account names
stay ASCII (they are topic levels): :func:`imcli.core.topics.is_name`.

A display name must also draw as itself (``imcli.core.text.is_plain``, the rule for all that
people write: no controls, bidi overrides, zero-width or blank characters, unassigned code
points; emoji sequences with their joiners are whole pictures and pass), no space at either
end or twice in a row, and at most two combining marks on a letter.
"""

from __future__ import annotations

import functools
import json
import unicodedata
from collections.abc import Iterable
from importlib import resources
from typing import Final

from imcli.core.text import is_pictographic, is_plain

DISPLAY_NAME_RULE: Final = (
    "1-32 characters: letters, digits and emoji of any script, with '_', '-', '.', an apostrophe "
    "or single spaces between them, starting with a letter, digit or emoji"
)
MAX_NAME: Final = 32
_PUNCTUATION = frozenset("_-.' ")
_MARKS_ON_ONE = 2
_LRM = "\u200e"  # the data wraps right-to-left characters in marks so that its JSON reads well


def _emoji(ch: str) -> bool:
    """An emoji a name may hold (😀 ❤ ⭐, a flag's letters, a skin tone): pictographic symbols of
    the emoji blocks only, never arrows or mathematical signs (``Bob → you`` would mimic a line)."""
    code = ord(ch)
    blocks = code >= 0x1F000 or 0x2600 <= code < 0x27C0 or 0x2B00 <= code < 0x2C00 or ch in "\u00a9\u00ae\u2122"
    return blocks and unicodedata.category(ch) in ("So", "Sk") and is_pictographic(ch)


def is_display_name(value: str) -> bool:
    """Whether ``value`` may be someone's display name (account names are display names too)."""
    if not value or len(value) > MAX_NAME or value != unicodedata.normalize("NFC", value):
        return False
    first = value[0]
    if not is_plain(value) or not (unicodedata.category(first).startswith(("L", "N")) or _emoji(first)):
        return False
    if value.endswith(" ") or "  " in value:
        return False
    marks = 0
    for ch in value:
        category = unicodedata.category(ch)
        if category in ("Mn", "Mc", "Me"):  # Me: a keycap's enclosing mark (1️⃣)
            marks += 1
            if marks > _MARKS_ON_ONE:
                return False
        elif category[0] in "LN" or ch in _PUNCTUATION or _emoji(ch):
            marks = 0
        elif category != "Cf":  # a ZWJ or a tag: is_plain let it through inside an emoji sequence only
            return False
    return True


def clean_display_name(value: str) -> str:
    """What a user typed, as stored: NFC (``é`` typed as ``e`` and a combining accent is ``é``)."""
    return unicodedata.normalize("NFC", value.strip())


@functools.lru_cache(maxsize=1 << 16)  # registration compares a name with every account's
def name_keys(name: str) -> frozenset[str]:
    """What makes two names the same name: they share a key. NFKC, case folding and confusable
    skeletons (TR39), taken in both orders: folded first, ``ALICE`` is ``alice``; skeleton first,
    an upper-case ``I`` that stands for an ``l`` (``AIice``) is ``alice`` too."""
    nfkc = unicodedata.normalize("NFKC", name)
    folded_first = _skeleton(unicodedata.normalize("NFKC", nfkc.casefold()))
    skeleton_first = _skeleton(unicodedata.normalize("NFKC", _skeleton(nfkc).casefold()))
    return frozenset((folded_first, skeleton_first))


def same_name(a: str, b: str) -> bool:
    return not name_keys(a).isdisjoint(name_keys(b))


def look_alike(name: str, taken: Iterable[str]) -> str | None:
    """The first of ``taken`` that is the same name as ``name`` (``name`` itself included)."""
    keys = name_keys(name)
    return next((other for other in taken if not keys.isdisjoint(name_keys(other))), None)


def _skeleton(text: str) -> str:
    representative = _classes()
    return "".join(representative.get(ch, ch) for ch in text)


@functools.cache
def _classes() -> dict[str, str]:
    """Each confusable character's class representative (the smallest code point in its class)."""
    data = json.loads(resources.files("confusable_homoglyphs").joinpath("confusables.json").read_text("utf-8"))
    parent: dict[str, str] = {}

    def find(ch: str) -> str:
        root = ch
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(ch, ch) != root:  # path compression
            parent[ch], ch = root, parent[ch]
        return root

    def union(a: str, b: str) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            low, high = (ra, rb) if ra < rb else (rb, ra)
            parent[high] = low

    for source, homoglyphs in data.items():
        if len(source) != 1:
            continue  # sequences ("rn" for "m") are left out: one character stands for one
        for entry in homoglyphs:
            other = str(entry.get("c", "")).strip(_LRM)
            if len(other) == 1:
                union(source, other)
    return {ch: find(ch) for ch in parent}


def label(account: str, nick: str | None) -> str:
    """How a person is shown everywhere: ``张三 (@zhang)``, or ``bob`` when the names agree.
    Not yet made safe: renderers pass it through ``imcli.core.text.safe``."""
    return account if not nick or nick == account else f"{nick} (@{account})"
