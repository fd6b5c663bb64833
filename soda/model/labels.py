"""Node labels: KEY=VALUE pairs an operator puts on a physical node (its
zone, its rack, whatever placement or people go by) and the rules they obey.

Keys and values are both short DNS-label-like strings (lowercase letters,
digits and '-', starting and ending with a letter or digit, at most 63
characters), so that they read the same in a flag, a YAML file, a table and
a log line without quoting. What a label means is its reader's business:
the scheduler spreads over `zone` (soda.master.scheduler); the rest is
carried and shown.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from soda.errors import InvalidSpec

LABEL_PART_MAX = 63
LABELS_MAX = 32
_LABEL_PART = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")
_RULE = ("lowercase letters, digits and '-', starting and ending with a letter or digit, "
         f"at most {LABEL_PART_MAX} characters")


def _check_part(what: str, text: Any, key: str = "") -> str:
    of = f" of label {key!r}" if key else ""
    if not isinstance(text, str):
        raise InvalidSpec(f"label {what}{of} must be a string, got {text!r}")
    if not text:
        raise InvalidSpec(f"label {what}{of} is empty: use {_RULE}")
    if len(text) > LABEL_PART_MAX or not _LABEL_PART.match(text):
        raise InvalidSpec(f"invalid label {what} {text!r}{of}: use {_RULE}")
    return text


def check_labels(labels: Any) -> dict[str, str]:
    """`labels` checked (a mapping of key to value, both by the rules
    above, at most LABELS_MAX of them), as a plain dict sorted by key."""
    if labels is None:
        return {}
    if not isinstance(labels, Mapping):
        raise InvalidSpec(f"labels must be a mapping of key to value, got {labels!r}")
    if len(labels) > LABELS_MAX:
        raise InvalidSpec(f"a node carries at most {LABELS_MAX} labels, got {len(labels)}")
    checked = {}
    for key, value in labels.items():
        key = _check_part("key", key)
        checked[key] = _check_part("value", value, key)
    return dict(sorted(checked.items()))


def parse_label(text: str) -> tuple[str, str]:
    """A `KEY=VALUE` from the command line, checked."""
    key, sep, value = text.partition("=")
    if not sep:
        raise InvalidSpec(f"label {text!r} must be KEY=VALUE, e.g. zone=a")
    key = _check_part("key", key)
    return key, _check_part("value", value, key)


def format_labels(labels: Mapping[str, str]) -> str:
    """`zone=a,rack=r1`, by key; "" for none."""
    return ",".join(f"{key}={labels[key]}" for key in sorted(labels))
