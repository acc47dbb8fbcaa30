"""What the settings table says about a setting, as text: its default as one would type it
on the command line, and its TOML type and values for forkserve.toml(5).

The man pages (forkserve.manpage) show these; nothing here writes mdoc.
"""

from __future__ import annotations

from forkserve.settings import Setting


def _number(value: float) -> str:
    """A float without a needless ".0" (30.0 is 30, 0.5 stays 0.5)."""
    return str(int(value)) if float(value).is_integer() else repr(value)


def default_text(setting: Setting) -> str | None:
    """The default as one would type it on the command line, or None when there is none to
    show (None, an empty string, a flag's False)."""
    default = setting.default
    if default is None or default == "" or default == [] or setting.flag:
        return None
    if setting.repeat:
        return ", ".join(str(item) for item in default)
    if isinstance(default, bool):
        return "true" if default else "false"
    if isinstance(default, int):
        return _round_trip(setting, default)
    if isinstance(default, float):
        return _number(default)
    return str(default)


def _round_trip(setting: Setting, value: int) -> str:
    """An integer as text that `parse` reads back as the same value: decimal, or octal for
    a setting parsed in octal (the umask)."""
    for text in (str(value), format(value, "03o")):
        try:
            if setting.parse(text) == value:
                return text
        except ValueError:
            continue
    return str(value)


def _octal(setting: Setting, value: int) -> bool:
    """Whether the command line takes `value` in octal (the umask)."""
    return _round_trip(setting, value) != str(value)


def _toml_integer_ok(setting: Setting, value: int) -> bool:
    """Whether a config file may give an octal setting as a TOML integer (0o022): the
    config loader turns a typed value back into command-line text with `to_text`."""
    to_text = getattr(setting, "to_text", str)
    try:
        return setting.parse(to_text(value)) == value
    except ValueError:
        return False


def toml_type(setting: Setting) -> str:
    """The TOML type a config file gives the setting in."""
    if setting.flag:
        return "boolean"
    if setting.repeat:
        return "array of strings"
    default = setting.default
    if isinstance(default, bool):
        return "boolean"
    if isinstance(default, int):
        if not _octal(setting, default):
            return "integer"
        return "octal integer or string" if _toml_integer_ok(setting, default) else "string"
    if isinstance(default, float):
        return "number"
    try:
        takes_integers = isinstance(setting.parse("1"), int)
    except (ValueError, OSError):
        takes_integers = False
    return "integer or string" if takes_integers else "string"


def toml_value(setting: Setting, value: object) -> str:
    """`value` written in TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(setting, item) for item in value) + "]"
    if isinstance(value, float):
        return _number(value)
    if isinstance(value, int):
        if not _octal(setting, value):
            return str(value)
        if _toml_integer_ok(setting, value):
            return "0o" + format(value, "03o")
        return toml_string(_round_trip(setting, value))
    return toml_string(str(value))


def toml_string(text: str) -> str:
    """`text` as a TOML string: a literal one ('...') when that spares escapes, else a basic
    one ("...") with backslashes and double quotes escaped."""
    if ('"' in text or "\\" in text) and "'" not in text and "\n" not in text:
        return f"'{text}'"  # a literal string: no escapes needed
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'

