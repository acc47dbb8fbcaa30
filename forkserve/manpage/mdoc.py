"""Writing mdoc(7) source: escaping text, macro arguments, literal displays and line filling.

These are the rules every line of the man pages goes through; nothing here knows which page
or section it writes (see forkserve.manpage for the pages and the command that writes
them).
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Iterable

# mdoc words that would be taken for a macro or a delimiter when they stand alone as an
# argument of a macro line: such arguments are quoted.
_DELIMITERS = {".", ",", ":", ";", "(", ")", "[", "]", "?", "!", "|"}
_MACRO_LIKE = re.compile(r"[A-Z][a-z]{1,2}|%[A-Z]")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9'\".(%-])")
_OPTION = re.compile(r"(?<![\w-])--?[A-Za-z][\w-]*|(?<![\w-])-(?![\w-])|(?<![\w-])-(?=\d)")


def _minus_in_options(text: str) -> str:
    """In an option (--bind, -b, a lone -) the hyphens are minus signs, so that they render
    (and copy) as ASCII hyphen-minus; hyphens inside words (keep-alive) stay hyphens."""
    return _OPTION.sub(lambda match: match.group(0).replace("-", "\\-"), text)


def _escape(text: str) -> str:
    """Text for roff: a backslash is \\e, options get minus signs."""
    return _minus_in_options(text.replace("\\", "\\e"))


def _line(text: str) -> str:
    """One text line: a leading dot or apostrophe would make it a request, so it is guarded."""
    text = text.strip()
    return "\\&" + text if text.startswith((".", "'")) else text


def text_lines(text: str, drop_default: bool = False) -> list[str]:
    """Prose from the settings table as mdoc text lines, one sentence per line (so that
    sentences end with the proper spacing). With `drop_default`, a sentence "Default: ..."
    is left out (the page then shows the default from the table, in its own words)."""
    sentences = [sentence for sentence in _SENTENCE_END.split(text.strip()) if sentence.strip()]
    if drop_default:
        sentences = [sentence for sentence in sentences if not sentence.startswith("Default:")]
    return [_line(_escape(sentence)) for sentence in sentences]


def finish(lines: list[str], width: int = 80) -> str:
    """The page's source: text lines longer than `width` are wrapped (outside literal
    displays), and a text line right after a display starts a new paragraph."""
    out: list[str] = []
    literal = False
    for line in lines:
        if line.startswith(".Bd -literal"):
            literal = True
        elif line == ".Ed":
            literal = False
        elif not literal and not line.startswith("."):
            if out and out[-1] == ".Ed":
                out.append(".Pp")
            if len(line) > width:
                out += [_line(part) for part in textwrap.wrap(
                    line, width, break_long_words=False, break_on_hyphens=False)]
                continue
        out.append(line)
    return "\n".join(out) + "\n"


def arg(word: str, literal: bool = False) -> str:
    """One argument of a macro line; `literal` text (Ql, Li) has every hyphen as a minus."""
    escaped = word.replace("\\", "\\e").replace('"', "\\(dq")
    escaped = escaped.replace("-", "\\-") if literal else _minus_in_options(escaped)
    if (not word or any(c.isspace() for c in word) or word in _DELIMITERS
            or _MACRO_LIKE.fullmatch(word)):
        return f'"{escaped}"'
    return escaped


def literal_block(lines: Iterable[str]) -> list[str]:
    """An indented literal display of `lines` (commands, file contents)."""
    out = [".Bd -literal -offset indent"]
    for text in lines:
        text = text.replace("\\", "\\e").replace("-", "\\-")
        # A guard before a leading dot or apostrophe; an empty line is written as \& too,
        # since a blank source line is a paragraph break in the rest of the page.
        out.append("\\&" + text if not text or text.startswith((".", "'")) else text)
    out.append(".Ed")
    return out


def fl(flag: str) -> str:
    """`Fl b` for -b, `Fl -bind` for --bind (Fl writes the leading hyphen, and every hyphen
    of its argument, as a minus sign)."""
    if not re.fullmatch(r"--?[A-Za-z0-9][\w-]*", flag):
        raise ValueError(f"not an option spelling: {flag!r}")
    return "Fl " + flag[1:]


def flag_item(flags: Iterable[str], metavar: str | None) -> str:
    """`-b ADDRESS, --bind ADDRESS` as the arguments of an .It (or .Op) line: each of `flags`
    with `metavar`, if any, after it."""
    parts = []
    for flag in flags:
        part = fl(flag)
        if metavar:
            part += " Ar " + arg(metavar)
        parts.append(part)
    return " , ".join(parts)

