"""The hand-written prose of forkserve.toml(5), with the parts generated from the settings
table (forkserve/manpage/generated.py) in their places, and the server hooks of
`config.HOOKS`, each described here.

`sections()` is the page from its DESCRIPTION on; forkserve.manpage writes the head
(date, title, NAME) and the page's file.
"""

from __future__ import annotations

from forkserve.config import HOOKS
from forkserve.manpage.generated import key_items, key_names
from forkserve.manpage.mdoc import arg, literal_block
from forkserve.manpage.values import toml_string
from forkserve.settings import DEFAULT_APP

DESCRIPTION_5 = r"""
.Sh DESCRIPTION
.Xr forkserve 1
reads its settings from the command line, the environment and a configuration file, in
that order of precedence: a value on the command line overrides the same setting in the
environment, which overrides the file, which overrides the default.
.Pp
The configuration file is the one given with
.Fl c
.Pq or Ev FORKSERVE_CONFIG ;
without one,
.Pa forkserve.toml
in the working directory
.Po
or the
.Fl -chdir
directory
.Pc
and then the
.Ql [tool.forkserve]
table of
.Pa pyproject.toml
there are read when present.
A file given with
.Fl c
is TOML unless its name ends in
.Pa .py
.Pq see Sx PYTHON CONFIGURATION FILES ;
a file named
.Pa pyproject.toml
is read for its
.Ql [tool.forkserve]
table.
.Pp
The file is TOML: each key is the name of a setting, as listed under
.Sx KEYS :
the long option with underscores for hyphens
.Po
.Ic max_requests
for
.Fl -max-requests
%KEY_NAMES%
Its value is typed as in TOML: strings, integers, floats, booleans, and arrays of
strings for the settings that can be repeated.
The key
.Ic app
gives the app as the
.Ar MODULE:VARIABLE
argument does.
.Pp
An unknown key or a bad value is refused before anything starts: one line on standard
error names the file, the key and what was expected, and
.Xr forkserve 1
exits with status 2.
.Pp
.Ql forkserve --check-config
validates the configuration, prints the effective value of every setting as TOML with
where it came from (default, configuration file, environment variable or command line),
and exits.
"""


def _description_5() -> list[str]:
    out = []
    for line in DESCRIPTION_5.strip().splitlines():
        out += key_names() if line == "%KEY_NAMES%" else [line]
    return out


def _keys() -> list[str]:
    return [
        ".Sh KEYS",
        ".Bl -tag -width Ds",
        ".It Ic app Pq string",
        "The app to serve, as the",
        ".Ar MODULE:VARIABLE",
        "argument of",
        ".Xr forkserve 1 .",
        "Default:",
        ".Ql " + arg(f"app = {toml_string(DEFAULT_APP)}", literal=True) + " .",
        *key_items(),
        ".El",
    ]


HOOK_DOCS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "on_starting": (("server",), ("In the master, before the sockets are bound.",
                                  "An exception stops the start, with exit status 1.")),
    "on_reload": (("server",), ("In the master, on", ".Dv SIGHUP ,",
                                "after the configuration was read again.")),
    "when_ready": (("server",), ("In the master, once every first worker has booted.",)),
    "pre_fork": (("server", "worker"), ("In the master, just before a worker is forked.",)),
    "post_fork": (("server", "worker"), ("In the new worker, right after the fork.",)),
    "worker_exit": (("server", "worker"), ("In the worker, after it stopped serving.",)),
}


def _hooks() -> list[str]:
    out = [
        ".Sh PYTHON CONFIGURATION FILES",
        "A configuration file whose name ends in",
        ".Pa .py ,",
        "given with",
        ".Fl c ,",
        "is run as Python.",
        "Its module-level names that are settings set them, with Python values",
        ".Pq the same keys and types as in TOML ;",
        "its functions named after a server hook are called as hooks.",
        "Hooks exist only in Python configuration files:",
        ".Bl -tag -width Ds",
    ]
    for name in HOOKS:
        if name not in HOOK_DOCS:
            raise LookupError(f"hook {name!r} has no description in HOOK_DOCS"
                              " (forkserve/manpage/forkserve_toml_5.py)")
        args, description = HOOK_DOCS[name]
        out.append(f".It Fn {name} {' '.join(args)}")
        out += description
    out += [
        ".El",
        ".Pp",
        ".Fa server",
        "is the master (its configuration is",
        ".Va server.cfg ) ;",
        ".Fa worker",
        "is the worker's record in the master, and the worker object in the worker",
        ".Pq Va worker.number .",
        "An exception in any hook but",
        ".Ic on_starting",
        "is logged with its traceback and the server carries on.",
    ]
    return out


FILES_5 = r"""
.Sh FILES
.Bl -tag -width Ds
.It Pa forkserve.toml
The configuration file, in the working directory.
.It Pa pyproject.toml
Its
.Ql [tool.forkserve]
table, used when there is no
.Pa forkserve.toml .
.El
"""


def _examples_5() -> list[str]:
    return [
        ".Sh EXAMPLES",
        "A",
        ".Pa forkserve.toml :",
    ] + literal_block([
        'app = "myapp:app"',
        'bind = ["unix:/run/myapp/forkserve.sock"]',
        "workers = 4",
        "max_requests = 1000",
        "max_requests_jitter = 100",
        "timeout = 60",
        "preload = true",
        'access_logfile = "-"',
        "umask = 0o027",
    ]) + [
        "The same in",
        ".Pa pyproject.toml :",
    ] + literal_block([
        "[tool.forkserve]",
        'app = "myapp:app"',
        'bind = ["unix:/run/myapp/forkserve.sock"]',
        "workers = 4",
    ]) + [
        "A Python configuration file, used with",
        ".Ql forkserve -c forkserve.conf.py :",
    ] + literal_block([
        'bind = ["unix:/run/myapp/forkserve.sock"]',
        "workers = 4",
        "max_requests = 10_000",
        "",
        "def post_fork(server, worker):",
        '    print(f"worker {worker.number} serving {server.cfg.app}")',
    ])


SEE_ALSO_5 = r"""
.Sh SEE ALSO
.Xr forkserve 1
"""


def sections() -> list[str]:
    """forkserve.toml(5) from its DESCRIPTION on: the configuration file, one key per
    setting, the Python configuration files and their hooks, and examples, as mdoc lines
    (long text lines are wrapped later, by `mdoc.finish`)."""
    return [
        *_description_5(),
        *_keys(),
        *_hooks(),
        *FILES_5.strip().splitlines(),
        *_examples_5(),
        *SEE_ALSO_5.strip().splitlines(),
    ]
