"""Printing text that came from users or their files to a terminal, safely.

File names, labels, captions, Parquet ``source`` cells, model specs and the error messages built
from them can contain anything: ``[bold]`` or ``[/]`` (console markup, which ``rich`` would
interpret or choke on), ESC sequences that recolour or retitle the terminal, carriage returns that
overwrite a line, bidirectional overrides that reorder what is shown, or bytes that are not UTF-8
(kept by Python as lone surrogates, which a UTF-8 terminal cannot encode).

Every such string goes through this module before it reaches the console:

- :func:`escape_control` shows control characters the way Python's ``repr`` does (ESC as ``\\x1b``,
  ``U+202E`` as ``\\u202e``; a byte that was not UTF-8, kept as a lone surrogate, as ``\\xe9``);
- :func:`safe_text` returns a ``rich.text.Text``, which rich never parses as markup (compose
  messages with ``Text.assemble``, never by formatting user data into a markup string).
"""

from __future__ import annotations

import re
from typing import Any

# C0 controls (tab and newline handled separately), DEL and the C1 controls, the bidirectional
# embeddings/overrides/isolates and marks, the line and paragraph separators, the byte-order mark,
# and lone surrogates (how Python keeps bytes that are not UTF-8 in a file name).
_UNSAFE = "\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ufeff\ud800-\udfff"
_UNSAFE_RE = re.compile(f"[{_UNSAFE}\t\n]")
_UNSAFE_KEEP_LINES_RE = re.compile(f"[{_UNSAFE}]")


def _escape_char(match: re.Match[str]) -> str:
    ch = match.group()
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # os.fsdecode's stand-in for the byte code - 0xDC00
        return f"\\x{code - 0xDC00:02x}"
    if ch == "\t":
        return "\\t"
    if ch == "\n":
        return "\\n"
    if ch == "\r":
        return "\\r"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_control(value: Any, *, keep_newlines: bool = False) -> str:
    """``str(value)`` with every control character shown as a ``repr``-style escape.

    Args:
        value: anything; it is turned into a string first.
        keep_newlines: keep ``\\n`` and ``\\t`` as they are (for multi-line messages); by default
            they are escaped too, so that a file name always prints on one line.

    >>> escape_control("\\x1b[31mred.png")
    '\\\\x1b[31mred.png'
    """
    text = str(value)
    pattern = _UNSAFE_KEEP_LINES_RE if keep_newlines else _UNSAFE_RE
    return pattern.sub(_escape_char, text)


def safe_text(value: Any, style: str = "", *, keep_newlines: bool = False) -> Any:
    """``value`` as a ``rich.text.Text`` (never interpreted as markup), control characters escaped.

    Use it for table cells, titles and ``Console.print`` arguments holding user data.
    """
    from rich.text import Text

    return Text(escape_control(value, keep_newlines=keep_newlines), style=style)


__all__ = ["escape_control", "safe_text"]
