"""Masking personal data and secrets in a corpus: e-mail, phone, ID numbers, IP, cards, API keys.

A model memorises rare strings it saw in training and can print them back, so personal data and
credentials are replaced by a type tag (``<EMAIL>``, ``<PHONE>``, ``<ID_NUMBER>``,
``<IP_ADDRESS>``, ``<CREDIT_CARD>``, ``<API_KEY>``) before tokenizing, and counted per type.

What is detected, and the checks that keep look-alikes out:

- e-mail addresses;
- API keys and tokens: OpenAI ``sk-...``, GitHub ``ghp_``/``gho_``/..., AWS ``AKIA...``, JWTs
  (``eyJ...``.``eyJ...``.sig), the token after ``Bearer``;
- Chinese resident ID numbers (18 characters, a valid birth date, the ISO 7064 MOD 11-2 check
  character) and US social security numbers (``123-45-6789`` with dashes, minus the ranges
  never issued);
- credit card numbers: 13-19 digits, spaces or dashes allowed, passing the Luhn check;
- IPv4 and IPv6 addresses that are valid and *global* (``ipaddress``): loopback, private and
  documentation ranges (127.0.0.1, 192.168.x.x, 2001:db8::) are not anyone's; an IPv4 after
  ``v`` is a version number (a bare four-part version like ``2.7.2.2`` is still masked);
- phone numbers: ``+`` and a country code (E.164-ish), Chinese mobiles (``1[3-9]`` and 9 digits,
  optionally ``+86``) and landlines (``010-12345678``), US numbers with separators
  (``(555) 234-5678``, ``555-234-5678``).

Limits: these are regular expressions, not named-entity recognition. Names and postal
addresses are *not* detected; a phone number written as a bare digit run without separators
is missed in US format; an unusual national format is missed. Presidio or a NER model would find
names but needs spaCy models downloaded at run time (the course downloads nothing by default)
and is slower by orders of magnitude on a CPU. ``pii_scores`` measures precision and recall on
a labelled sample (``data/pii_sample.txt``) with their intervals.

Usage::

    from lmref.data.pii import mask_pii, mask_documents, pii_scores

    text, counts = mask_pii("mail bob@example.org or call +86 138 0013 8000")
    # ('mail <EMAIL> or call <PHONE>', Counter({'EMAIL': 1, 'PHONE': 1}))
    docs, stats = mask_documents(docs)                       # a pipeline step
    precision, recall = pii_scores(Path("data/pii_sample.txt").read_text().splitlines())
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from lmref.core.stats import Score

if TYPE_CHECKING:
    from lmref.data.sources import Document

_CN_ID_WEIGHTS = [2 ** (17 - i) % 11 for i in range(17)]


def cn_id_valid(number: str) -> bool:
    """ISO 7064 MOD 11-2 check character of an 18-character Chinese resident ID."""
    total = sum(int(d) * w for d, w in zip(number[:17], _CN_ID_WEIGHTS))
    return "10X98765432"[total % 11] == number[17].upper()


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum of a card number (digits only)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def _global_ip(text: str) -> bool:
    if ":" in text and sum(bool(g) for g in text.split(":")) < 3:
        return False  # '::f' in a netmask listing: too little to be a host's address
    try:
        return ipaddress.ip_address(text).is_global
    except ValueError:
        return False


def _card(text: str) -> bool:
    digits = re.sub(r"[ -]", "", text)
    return 13 <= len(digits) <= 19 and luhn_valid(digits)


_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
# (tag, pattern, check of the match or None), applied in this order on what earlier ones left:
# keys and e-mails first (they hold digit runs), IDs before cards (an 18-digit ID may pass Luhn).
PATTERNS: tuple[tuple[str, re.Pattern, Callable[[str], bool] | None], ...] = (
    (
        "API_KEY",
        re.compile(
            r"\bsk-(?:proj-)?[A-Za-z0-9_-]{20,}|\bgh[pousr]_[A-Za-z0-9]{30,}"
            r"|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"
            r"|\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"
            r"|(?<=Bearer )[A-Za-z0-9._~+/-]{16,}=*"
        ),
        None,
    ),
    (
        "EMAIL",
        re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"),
        None,
    ),
    (
        "ID_NUMBER",
        re.compile(
            r"(?<![\dA-Za-z])[1-9]\d{5}(?:19|20)\d\d(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])"
            r"\d{3}[\dXx](?![\dA-Za-z])"
        ),
        cn_id_valid,
    ),
    (
        "ID_NUMBER",
        re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}-(?!00)\d\d-(?!0000)\d{4}(?![\d-])"),
        None,
    ),
    ("CREDIT_CARD", re.compile(r"(?<![\d.-])\d(?:[ -]?\d){12,18}(?![\d-]|\.\d)"), _card),
    (
        "IP_ADDRESS",
        re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])"),
        _global_ip,
    ),
    (
        "IP_ADDRESS",
        re.compile(rf"(?<![\w.])(?<!v)(?:{_OCTET}\.){{3}}{_OCTET}(?![\w]|\.\d)"),
        _global_ip,
    ),
    (
        "PHONE",
        re.compile(
            r"(?<![\w+])\+[1-9]\d{0,2}[ -]?\(?\d{1,4}\)?(?:[ -]?\d{2,4}){2,4}(?!\d|\.\d)"  # +CC ...
            r"|(?<!\d)(?:86[ -]?)?1[3-9]\d[ -]?\d{4}[ -]?\d{4}(?!\d)"  # Chinese mobile
            r"|(?<![\d-])0\d{2,3}-\d{7,8}(?!\d)"  # Chinese landline: area code, number
            r"|(?<![\d-])(?:\(\d{3}\) ?|\d{3}[-.])\d{3}[-.]\d{4}(?![\d-])"  # US
        ),
        None,
    ),
)


def mask_pii(text: str) -> tuple[str, Counter]:
    """``text`` with every detected item replaced by ``<TYPE>``, and the count per type."""
    counts: Counter = Counter()
    for tag, pattern, check in PATTERNS:

        def sub(m: re.Match, tag: str = tag, check=check) -> str:
            if check is not None and not check(m.group()):
                return m.group()
            counts[tag] += 1
            return f"<{tag}>"

        text = pattern.sub(sub, text)
    return text, counts


def mask_documents(docs: Sequence[Document]) -> tuple[list[Document], dict]:
    """The pipeline step: every document masked; counts per type and documents touched."""
    out, total, touched = [], Counter(), 0
    for doc in docs:
        text, counts = mask_pii(doc.text)
        touched += bool(counts)
        total += counts
        out.append(replace(doc, text=text) if counts else doc)
    return out, {
        "docs_in": len(docs),
        "docs_masked": touched,
        "masked": dict(sorted(total.items())),
    }


_LABEL = re.compile(r"\[\[([A-Z_]+):(.+?)\]\]")


def pii_scores(labelled_lines: Sequence[str]) -> tuple[Score, Score]:
    """(precision, recall) of :func:`mask_pii` on lines where each planted item is written
    ``[[TYPE:value]]``; a detection is right when its span and type match a planted item."""
    found = right = planted = 0
    for line in labelled_lines:
        if not line.strip() or line.startswith("#"):
            continue
        expected = _LABEL.sub(lambda m: f"<{m.group(1)}>", line)
        raw = _LABEL.sub(lambda m: m.group(2), line)
        masked, counts = mask_pii(raw)
        planted += len(_LABEL.findall(line))
        found += sum(counts.values())
        # Right detections: tags of the masked line that sit where the labels put them.
        right += _aligned_tags(masked, expected)
    if not planted or not found:
        raise ValueError(f"need planted items and detections, got {planted=} {found=}")
    return Score(right, found), Score(right, planted)


def _aligned_tags(masked: str, expected: str) -> int:
    """Tags in ``masked`` that match a tag of ``expected`` with the same text around them."""
    import difflib

    a, b = re.split(r"(<[A-Z_]+>)", masked), re.split(r"(<[A-Z_]+>)", expected)
    matcher = difflib.SequenceMatcher(a=a, b=b, autojunk=False)
    return sum(
        1
        for tag, i1, i2, _, _ in matcher.get_opcodes()
        if tag == "equal"
        for piece in a[i1:i2]
        if re.fullmatch(r"<[A-Z_]+>", piece)
    )
