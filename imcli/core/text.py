"""Other people's text made fit for one line of a terminal: one sanitiser, for the CLI's
renderer (:mod:`imcli.cli.render`) and for the logs of ``imcli serve`` and ``imcli workers``,
which quote what clients sent (client ids, user names, topics) on the operator's terminal.
Standard library only."""

from __future__ import annotations

import logging
import unicodedata


def _shown(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


# Cc: C0 and C1 controls (CR, LF, NEL, ESC …); Zl, Zp: U+2028, U+2029; Cf: every format character,
# the bidi embeddings, overrides, isolates and marks among them (U+202A to 202E, U+2066 to 2069, U+200E,
# U+200F, U+061C), zero-width ones too (a nickname with a U+200B looks like one without); Cs: a lone
# surrogate (JSON can carry one), which a terminal cannot even encode
# Cn: unassigned code points and noncharacters (U+FFFF, U+FDD0 …), which terminals draw as nothing or
# as anything
_HIDDEN = frozenset(("Cc", "Cf", "Cs", "Zl", "Zp", "Cn"))
# letters that draw nothing: the Hangul fillers make a name or a line look empty
_BLANK = frozenset("\u115f\u1160\u3164\uffa0")
_MARKS = frozenset(("Mn", "Mc", "Me"))  # combining marks, variation selectors and U+034F among them
MAX_MARKS = 4  # on one base character: written languages need fewer; "Zalgo" text stacks dozens


ZWJ = "\u200d"
_VS16 = "\ufe0f"  # emoji presentation
_SKIN_TONES = range(0x1F3FB, 0x1F400)  # emoji modifiers (Sk): 👍🏽
_BLACK_FLAG = "\U0001f3f4"  # the base of a subdivision flag, 🏴 + tag letters + a cancel tag
_TAGS = range(0xE0020, 0xE007F)
_CANCEL_TAG = "\U000e007f"
# the emoji blocks (Extended_Pictographic lies within these, with the few Latin-1 and punctuation
# signs that have emoji forms); unassigned code points in them are still Cn
_PICTOGRAPHIC = (
    range(0x2190, 0x2C00), range(0x1F000, 0x1FB00), range(0x3030, 0x3031), range(0x303D, 0x303E),
    range(0x3297, 0x3298), range(0x3299, 0x329A),
)  # fmt: skip
_PICTOGRAPHIC_SIGNS = frozenset("\u00a9\u00ae\u203c\u2049\u2122\u2139")


def is_pictographic(ch: str) -> bool:
    """Whether ``ch`` is an assigned emoji-like symbol (a ZWJ sequence's part, a flag's letter)."""
    code = ord(ch)
    return (ch in _PICTOGRAPHIC_SIGNS or any(code in r for r in _PICTOGRAPHIC)) and unicodedata.category(ch) != "Cn"


def emoji_joins(text: str) -> frozenset[int]:
    """Where ``text`` holds a format character that belongs to an emoji sequence, and so draws as
    part of one picture: a ZWJ between two emoji (👩‍👩‍👧, 🏳️‍🌈; a variation selector or skin tone
    may follow the first), and the tag letters of a subdivision flag (🏴 + tags + cancel tag)."""
    found: set[int] = set()
    for i, ch in enumerate(text):
        if ch == ZWJ and 0 < i < len(text) - 1 and is_pictographic(text[i + 1]):
            j = i - 1
            while j > 0 and (text[j] == _VS16 or ord(text[j]) in _SKIN_TONES):
                j -= 1
            if is_pictographic(text[j]) and ord(text[j]) not in _SKIN_TONES:
                found.add(i)
        elif ch == _BLACK_FLAG:
            j = i + 1
            while j < len(text) and ord(text[j]) in _TAGS:
                j += 1
            if j > i + 1 and j < len(text) and text[j] == _CANCEL_TAG:
                found.update(range(i + 1, j + 1))
    return frozenset(found)


def is_plain(text: str, *, lines: bool = False) -> bool:
    """The one rule for what people write (display names, signatures, about texts, moments,
    comments, file names): text that ``safe`` leaves as it is, so that it draws as itself on
    one line (``lines``: on several, split at line feeds only). Letters and emoji of any kind
    (ZWJ sequences, skin tones, keycaps, flags) pass; controls, line and paragraph separators,
    bidi overrides and isolates, zero-width spaces and joiners outside an emoji sequence,
    unassigned code points and marks without a letter do not."""
    return all(safe(part) == part for part in (text.split("\n") if lines else (text,)))


def plain_file_name(name: str) -> str:
    """A local file's name as a file message may carry it (``is_plain``, no ``/`` or ``\\``, not
    ``.`` or ``..``): each character ``safe`` would escape, and each slash, becomes ``_``. The
    files worker refuses any other name; a person sending ``report\tfinal.pdf`` or a name with a
    bidi override gets the file sent under a name everyone sees as it is, not a refusal."""
    chars = ["_" if ch in "/\\" else ch for ch in name]
    while True:  # safe() keeps what it leaves alone, so its first difference is the next character to replace
        text = "".join(chars)
        shown = safe(text)
        if shown == text:
            return text if text not in ("", ".", "..") else "_" * max(1, len(text))
        first = next(i for i, (a, b) in enumerate(zip(text, shown, strict=False)) if a != b)
        chars[first] = "_"


def safe(text: str) -> str:
    """Text from the wire, made fit for one line of a terminal: every control, line or paragraph
    separator, format character, unassigned code point and blank letter is shown as its escape
    (``\\x0a``, ``\\x1b``, ``\\u2028``, ``\\u202e``, ``\\u3164``) instead of being acted upon, so
    no text can break a line, move the cursor, restyle the terminal or reorder what is around it.
    A combining mark with no base character in ``text`` (it would stack on what is printed before
    it: a separator, a sender's name) and any past ``MAX_MARKS`` on one base (they pile over the
    lines above and below) are escaped too. The one exception: a ZWJ or tag character inside an
    emoji sequence (👩‍👩‍👧, 🏴 and its tags), which joins pictures into one and moves nothing.
    Every renderer of others' text goes through here."""
    if text.isprintable() and text.isascii():  # the common case, and nothing to do
        return text
    out: list[str] = []
    marks = MAX_MARKS  # marks on the current base; full at the start: a first mark has no base here
    joins = emoji_joins(text) if ZWJ in text or _BLACK_FLAG in text else frozenset()
    for i, ch in enumerate(text):
        category = unicodedata.category(ch)
        if category in _MARKS:
            if marks < MAX_MARKS:
                marks += 1
                out.append(ch)
            else:
                out.append(_shown(ch))
        elif i in joins:
            out.append(ch)
            marks = MAX_MARKS  # nothing stacks on a joiner or a tag
        elif category in _HIDDEN or ch in _BLANK:
            out.append(_shown(ch))
            marks = MAX_MARKS  # an escape ends in a digit: no mark may stack on it
        else:
            out.append(ch)
            marks = 0
    return "".join(out)


QUOTED_MAX = 40  # characters of what was typed that a message quotes; longer is cut, with "…"


def quoted(text: str, limit: int = QUOTED_MAX) -> str:
    """What a person typed (an argument, a file name, a variable) or a server sent, quoted in a
    message: ``safe``, between single quotes, cut after ``limit`` characters (``'xxxx…'``). The one
    way an error line quotes a value: Python's ``repr`` leaves blank letters (U+3164) and any pile
    of combining marks as they are, and quotes 100 kB whole."""
    return "'" + safe(text if len(text) <= limit else text[:limit] + "…") + "'"


class SafeFormatter(logging.Formatter):
    """A log line whose message is ``safe``: a client id such as ``x\\x1b]52;c;…`` (a clipboard
    write) or ``x\\n12:00:01 …`` (a forged log line) is logged as its escapes. A traceback
    keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        record.message = safe(record.message)
        return super().formatMessage(record)


def log_to_stderr(level: int, fmt: str) -> None:
    """``logging.basicConfig(level=level, format=fmt)``, with every root handler's lines ``safe``."""
    logging.basicConfig(level=level, format=fmt)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(SafeFormatter(fmt))


def human_size(size: int) -> str:
    """Bytes for people: ``512 bytes``, ``1.5 KiB``, ``100 MiB``, ``2.3 GiB``."""
    if size < 1024:
        return f"{size} byte" + ("" if size == 1 else "s")
    value = float(size)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}".replace(".0 ", " ")
    raise AssertionError("unreachable")
