"""PII scrubbing: e-mail addresses, phone numbers, IP addresses and card numbers.

Each match is replaced by a placeholder (``[EMAIL]``, ``[PHONE]``, ``[IP]``,
``[CARD]``) so the text keeps its shape and a model learns that such things
appear there, without learning anyone's actual details.

Regexes find candidates; a validator then decides, which keeps look-alikes out:
IP addresses must parse (``ipaddress``), card numbers need a known issuer prefix,
a matching length and a valid Luhn checksum, and phone numbers must have one of
the shapes people write them in (``+CC ...``, ``00CC ...``, US ``(415) 555-2671``,
European national ``020 7946 0958`` with one consistent separator). Dates,
prices, versions, times, order numbers and MAC addresses are left alone.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

KINDS = ("email", "phone", "ip", "card")
PLACEHOLDERS = {"email": "[EMAIL]", "phone": "[PHONE]", "ip": "[IP]", "card": "[CARD]"}

# File names like "logo@2x.png" look like addresses; these "TLDs" are file extensions.
_FILE_EXTENSIONS = {"png", "jpg", "jpeg", "gif", "svg", "webp", "bmp", "ico", "pdf", "zip", "tif", "tiff"}

_EMAIL = re.compile(
    r"(?<![\w.+\-])[A-Za-z0-9][A-Za-z0-9._%+\-]*@"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?\.)+([A-Za-z]{2,24})\b(?!@)"
)

_IPV4 = re.compile(
    r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?!\.?\d|\w)"
)
# Loose IPv6 shape (hex groups and colons, optionally an IPv4 tail); ipaddress decides.
_IPV6 = re.compile(
    r"(?<![\w:.])[0-9A-Fa-f:]*:[0-9A-Fa-f:]*:(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9A-Fa-f]*)(?![\w:]|\.\d)"
)

# 13-19 digits, optionally in groups separated by one space or hyphen.
_CARD = re.compile(r"(?<![\w\-.,])\d(?:[ \-]?\d){12,18}(?![\w]|[\-.,]\d)")

_PHONE = re.compile(
    r"(?<![\w+\-./])(?:"
    r"(?:\+|\b00)[1-9]\d{0,2}[ .\-]?(?:\(0?\d{1,4}\)[ .\-]?)?\d{1,12}(?:[ .\-]\d{1,10}){0,5}"  # international
    r"|(?:\+?1[ .\-]?)?(?:\([2-9]\d{2}\)[ .\-]?|[2-9]\d{2}[ .\-])[2-9]\d{2}[ .\-]\d{4}"  # North American
    r"|0\d{1,4}(?:[ .\-]\d{2,8}){1,4}"  # European national, trunk prefix 0
    r")(?![\w]|[.\-/]\d)"
)
_DATE_LIKE = re.compile(r"^\d{1,4}[./\-]\d{1,2}[./\-]\d{1,4}")


def _email_ok(m: re.Match) -> bool:
    return m.group(1).lower() not in _FILE_EXTENSIONS


def _ipv4_ok(m: re.Match) -> bool:
    return True  # the regex already checks each octet is 0-255


def _ipv6_ok(m: re.Match) -> bool:
    text = m.group(0)
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    # Require some substance, so "::", "a::b" or "::1" in prose or code are left alone.
    groups = sum(1 for g in text.split(":") if g) + ("." in text)  # an IPv4 tail is two groups
    return groups >= 3


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum every payment card number satisfies."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card_issuer_ok(digits: str) -> bool:
    """Known issuer prefixes (IIN ranges) and the lengths their cards have."""
    n = len(digits)
    p2, p4 = int(digits[:2]), int(digits[:4])
    if digits[0] == "4":  # Visa
        return n in (13, 16, 19)
    if 51 <= p2 <= 55 or 2221 <= p4 <= 2720:  # Mastercard
        return n == 16
    if p2 in (34, 37):  # American Express
        return n == 15
    if p2 in (36, 38, 39) or 300 <= int(digits[:3]) <= 305:  # Diners Club
        return 14 <= n <= 19
    if 3528 <= p4 <= 3589:  # JCB
        return 16 <= n <= 19
    if digits[0] == "6" or p2 == 50 or 56 <= p2 <= 58:  # Discover, UnionPay, Maestro
        return 13 <= n <= 19
    return False


def _card_ok(m: re.Match) -> bool:
    text = m.group(0)
    separators = set(re.findall(r"[ \-]", text))
    if len(separators) > 1:
        return False
    digits = re.sub(r"\D", "", text)
    return _card_issuer_ok(digits) and luhn_ok(digits)


def _phone_ok(m: re.Match) -> bool:
    text = m.group(0)
    digits = re.sub(r"\D", "", text)
    if text.startswith("+"):
        return 8 <= len(digits) <= 15
    if text.startswith("00"):
        return 10 <= len(digits) <= 17
    if text.startswith("0") and not text.startswith("0("):
        # European national numbers: 9-11 digits, one kind of separator, not a date.
        if len(set(re.findall(r"[ .\-]", text))) != 1 or _DATE_LIKE.match(text):
            return False
        return 9 <= len(digits) <= 11
    return len(digits) in (10, 11)  # North American, with or without the leading 1


# Order matters: e-mails first (they contain digits and dots), cards before phones
# (a grouped card number has a phone-like shape).
# The last item says whether a match is possible at all, from cheap facts about the text
# (does it hold an "@", two colons, a digit?), to skip most regex scans on plain prose.
_DIGIT = re.compile(r"\d")
_SCRUBBERS: list[tuple[str, re.Pattern, Callable[[re.Match], bool], Callable[[str, bool], bool]]] = [
    ("email", _EMAIL, _email_ok, lambda t, digits: "@" in t),
    ("ip", _IPV6, _ipv6_ok, lambda t, digits: t.count(":") >= 2),
    ("ip", _IPV4, _ipv4_ok, lambda t, digits: digits and "." in t),
    ("card", _CARD, _card_ok, lambda t, digits: digits),
    ("phone", _PHONE, _phone_ok, lambda t, digits: digits),
]


def scrub_pii(text: str) -> tuple[str, dict[str, int]]:
    """Replace PII with placeholders; return the new text and the count of each kind."""
    counts = dict.fromkeys(KINDS, 0)
    digits = _DIGIT.search(text) is not None
    for kind, pattern, ok, precheck in _SCRUBBERS:
        placeholder = PLACEHOLDERS[kind]

        def replace(m: re.Match, kind: str = kind, ok: Callable = ok, placeholder: str = placeholder) -> str:
            if not ok(m):
                return m.group(0)
            counts[kind] += 1
            return placeholder

        if precheck(text, digits):
            text = pattern.sub(replace, text)
    return text, counts


def find_pii(text: str, kinds: tuple[str, ...] | list[str] = KINDS) -> list[tuple[str, int, int]]:
    """``(kind, start, end)`` of each validated match of ``kinds`` in ``text``, without replacing anything.
    A span already claimed by an earlier detector (an e-mail before a phone) is not reported twice."""
    digits = _DIGIT.search(text) is not None
    found: list[tuple[str, int, int]] = []
    taken: list[tuple[int, int]] = []
    for kind, pattern, ok, precheck in _SCRUBBERS:
        if not precheck(text, digits):
            continue
        for m in pattern.finditer(text):
            if not ok(m) or any(s < m.end() and m.start() < e for s, e in taken):
                continue
            taken.append((m.start(), m.end()))
            if kind in kinds:
                found.append((kind, m.start(), m.end()))
    return sorted(found, key=lambda f: f[1])
