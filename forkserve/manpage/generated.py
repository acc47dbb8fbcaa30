"""The parts of the man pages generated from the settings table and the argument parser.

From `settings.SETTINGS` (and the options of the parser that are not settings, such as
--check-config): the options in the SYNOPSIS of forkserve(1), its OPTIONS entries and
ENVIRONMENT variables, and the KEYS of forkserve.toml(5). Each function returns mdoc lines
that the page's prose (forkserve/manpage/forkserve_1.py, forkserve/manpage/forkserve_toml_5.py)
puts in their place, so a new setting cannot go undocumented.
"""

from __future__ import annotations

import argparse

from forkserve.config import build_parser
from forkserve.manpage.mdoc import arg, fl, flag_item, text_lines
from forkserve.manpage.values import default_text, toml_type, toml_value
from forkserve.settings import SETTINGS, Setting

# Titles of the option groups (Setting.section); a section not named here is capitalized.
SECTION_TITLES = {
    "server": "Server and workers",
    "app": "The application",
    "websocket": "WebSocket",
    "tls": "TLS (HTTPS)",
    "privileges": "Privileges",
    "logging": "Logging",
}


def _sections() -> list[tuple[str, list[Setting]]]:
    """The settings grouped by section, in the table's order, each under its title."""
    grouped: dict[str, list[Setting]] = {}
    for setting in SETTINGS:
        grouped.setdefault(setting.section, []).append(setting)
    return [(SECTION_TITLES.get(name, name.capitalize()), settings)
            for name, settings in grouped.items()]


def _extra_actions() -> list[argparse.Action]:
    """Options of the parser that are not settings and not written up as prose in
    forkserve(1) (the app, -c, -h and --version are)."""
    names = {setting.name for setting in SETTINGS} | {"help", "version", "config", "app"}
    return [action for action in build_parser()._actions
            if action.option_strings and action.dest not in names]


def _action_metavar(action: argparse.Action) -> str | None:
    """What an option of the parser takes, as shown after it; None for a flag."""
    return None if action.nargs == 0 else (action.metavar or action.dest.upper())


def _metavar(setting: Setting) -> str | None:
    """What a setting's option takes, as shown after it; None for a flag."""
    return None if setting.flag else (setting.metavar or setting.name.upper())


def _every_flag(setting: Setting) -> str:
    """Every spelling of the setting's option as Fl macros (`Fl b , Fl -bind`), to follow
    the dot of a macro line."""
    return " , ".join(fl(flag) for flag in setting.flags)


def _default(text: str) -> list[str]:
    """The sentence giving a default, `text` shown literally."""
    return ["Default:", ".Ql " + arg(text, literal=True) + " ."]


# -- forkserve(1) -----------------------------------------------------------------------------


def synopsis_options() -> list[str]:
    """The .Op lines of the SYNOPSIS: the parser's options that are not settings (their long
    spelling), then each setting (its first spelling), in the table's order."""
    out = []
    for action in _extra_actions():
        out.append(".Op " + flag_item(action.option_strings[-1:], _action_metavar(action)))
    for setting in SETTINGS:
        out.append(".Op " + flag_item(setting.flags[:1], _metavar(setting)))
    return out


def extra_option_items() -> list[str]:
    """The .It entries, for the General options, of the parser's options that are not
    settings (such as --check-config), each described by its help."""
    out = []
    for action in _extra_actions():
        out.append(".It " + flag_item(action.option_strings, _action_metavar(action)))
        out += text_lines((action.help or "").replace("%%", "%"))
    return out


def _option_entry(setting: Setting) -> list[str]:
    """A setting's .It entry in OPTIONS: its help, its default, its variable and key."""
    out = [".It " + flag_item(setting.flags, _metavar(setting))]
    default = default_text(setting)
    out += text_lines(setting.help, drop_default=default is not None)
    if default is not None:
        out += _default(default)
    out += ["Environment:", ".Ev " + setting.env + " ;", "configuration key:",
            ".Ic " + arg(setting.name) + " ."]
    return out


def option_groups() -> list[str]:
    """The subsections of OPTIONS that follow General: one per section of the table (see
    SECTION_TITLES), each a tag list with an entry per setting."""
    out = []
    for title, settings in _sections():
        out += [".Ss " + title, ".Bl -tag -width Ds"]
        for setting in settings:
            out += _option_entry(setting)
        out.append(".El")
    return out


def environment_items() -> list[str]:
    """The .It entries of ENVIRONMENT for the settings' variables, in the table's order."""
    out = []
    for setting in SETTINGS:
        out.append(".It Ev " + setting.env)
        out += ["Same as", f".{_every_flag(setting)} ."]
        if setting.repeat:
            out.append("Several values are separated by commas.")
    return out


# -- forkserve.toml(5) ------------------------------------------------------------------------


def key_names() -> list[str]:
    """The end of the sentence on key names (from the closing parenthesis): the settings
    named otherwise than their long option."""
    odd = [setting for setting in SETTINGS
           if all(flag.lstrip("-").replace("-", "_") != setting.name for flag in setting.flags)]
    if not odd:
        return [".Pc ."]
    out = [".Pc ,", "except"]
    for n, setting in enumerate(odd):
        long_flag = max(setting.flags, key=len)
        sep = " ." if n == len(odd) - 1 else (" and" if n == len(odd) - 2 else " ,")
        out += [".Ic " + arg(setting.name), "for", "." + fl(long_flag) + sep]
    return out


def key_items() -> list[str]:
    """The .It entries of KEYS for the settings, in the table's order: the TOML type, the
    help, the default as a line of TOML, the option and the variable."""
    out = []
    for setting in SETTINGS:
        out.append(f".It Ic {arg(setting.name)} Pq {toml_type(setting)}")
        has_default = default_text(setting) is not None or setting.flag
        out += text_lines(setting.help, drop_default=has_default)
        if has_default:
            out += _default(f"{setting.name} = {toml_value(setting, setting.default)}")
        out += ["Command line:", f".{_every_flag(setting)} ;", "environment:",
                ".Ev " + setting.env + " ."]
    return out
