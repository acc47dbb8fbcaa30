"""The hand-written prose of forkserve(1), with the parts generated from the settings table
(forkserve/manpage/generated.py) in their places; the SIGNALS and CONTROL sections are in
forkserve/manpage/signals_control.py.

`sections()` is the page from its SYNOPSIS on; forkserve.manpage writes the head
(date, title, NAME) and the page's file.
"""

from __future__ import annotations

from forkserve.config import APP_ENV, CONFIG_ENV, CONFIG_FILE
from forkserve.manpage.generated import (
    environment_items,
    extra_option_items,
    option_groups,
    synopsis_options,
)
from forkserve.manpage.mdoc import arg, flag_item, literal_block
from forkserve.manpage.signals_control import CONTROL, SIGNALS
from forkserve.settings import DEFAULT_APP
from forkserve.sockets import INHERIT_ENV


def _synopsis() -> list[str]:
    return [
        ".Nm",
        ".Op Fl c Ar FILE",
        *synopsis_options(),
        ".Op Ar MODULE:VARIABLE",
        ".Nm",
        ".Fl -version",
        ".Nm",
        ".Fl h",
    ]


DESCRIPTION_1 = r"""
.Nm
is a preforking HTTP/1.1 server for Python web applications: WSGI
.Pq PEP 3333: Flask, Django, any WSGI callable
and ASGI
.Pq FastAPI, Starlette, Django async, Quart ,
with WebSocket.
.Pp
A master process binds the listening sockets
.Po
or adopts those passed by
.Xr systemd.socket 5
.Pc
and forks one worker per usable CPU: the CPUs this process may run on, capped by the
cgroup CPU quota
.Pq see Fl w .
The master never serves a request, and never imports the app unless
.Fl -preload
is given; each worker imports the app, accepts connections on the shared sockets in its
own event loop and calls the app.
The master supervises the workers over one pipe each: a worker reports there that it
booted, then sends a heartbeat at least every quarter of
.Fl -timeout
.Pq and at least every second
with its request counters.
A worker silent past
.Fl -timeout
is taken to be hung: the master makes it write the traceback of every thread to the
error log, kills it and starts a replacement.
A worker that dies is replaced; one that keeps dying soon after booting is restarted with
a growing delay (0.5 s doubling to 30 s).
.Pp
Each worker runs one event loop (uvloop when it is installed) that accepts connections and
reads requests.
A WSGI app is called inline in that loop, or in a pool of
.Fl -threads
threads; an ASGI app runs as a task per request.
The worker kind follows the app's interface unless
.Fl k
says otherwise.
.Pp
The app is given as
.Ar MODULE:VARIABLE ,
or as
.Ar MODULE:FACTORY(ARGS)
to call a factory with literal arguments.
With no app argument
.Nm
serves its demo app
.Pq Ql forkserve.demo:app ,
a page naming the worker that answered.
.Ql python -m forkserve
is the same command.
.Pp
Settings come from the command line, the environment
.Pq Ev FORKSERVE_*
and a configuration file
.Pq Xr forkserve.toml 5 ,
in that order of precedence.
"""


def _general_options() -> list[str]:
    return [
        ".Ss General",
        ".Bl -tag -width Ds",
        ".It Ar MODULE:VARIABLE",
        "The app to serve: a module and the name of the WSGI or ASGI callable in it, or",
        ".Ar MODULE:FACTORY(ARGS)",
        "to call a factory whose arguments are Python literals.",
        "A",
        ".Ar MODULE",
        "alone looks for",
        ".Va app ,",
        "then",
        ".Va application",
        "(a Django project's",
        ".Ql wsgi",
        "module).",
        "Default:",
        ".Ql " + arg(DEFAULT_APP, literal=True) + " ,",
        "the demo app.",
        "Environment:",
        ".Ev " + APP_ENV + " .",
        ".It " + flag_item(("-c", "--config"), "FILE"),
        "The configuration file: TOML",
        ".Pq Xr forkserve.toml 5 ,",
        "a",
        ".Pa pyproject.toml",
        "with a",
        ".Ql [tool.forkserve]",
        "table, or a Python file",
        ".Pq ending in Pa .py",
        "that may also define server hooks.",
        "Without this option",
        ".Pa " + CONFIG_FILE,
        "and then the",
        ".Ql [tool.forkserve]",
        "table of",
        ".Pa pyproject.toml",
        "are read from the working directory",
        ".Po",
        "or the one given with",
        ".Fl -chdir",
        ".Pc",
        "when present.",
        "The environment and the command line override the file.",
        "Environment:",
        ".Ev " + CONFIG_ENV + " .",
        *extra_option_items(),
        ".It " + flag_item(("-h", "--help"), None),
        "Print the options with a short description of each, and exit.",
        ".It Fl -version",
        "Print the version of",
        ".Nm",
        "and exit.",
        ".El",
    ]


def _options() -> list[str]:
    return [
        ".Sh OPTIONS",
        "The options under",
        ".Sx General",
        "are not settings; every other option is a setting that can also be given in the",
        "environment",
        ".Pq Sx ENVIRONMENT",
        "and in the configuration file, under the name shown as its configuration key",
        ".Pq Xr forkserve.toml 5 .",
        "An option that takes a value accepts it as the next argument or after",
        ".Ql = ;",
        "flags that gunicorn has keep gunicorn's spelling.",
        *_general_options(),
        *option_groups(),
    ]


def _environment() -> list[str]:
    return [
        ".Sh ENVIRONMENT",
        "Each setting can be given in a variable named after it; the command line overrides",
        "the environment, which overrides the configuration file.",
        "A value is written as on the command line; a repeatable setting takes several",
        "values separated by commas, a flag",
        ".Ql 1 , true , yes , on",
        "or",
        ".Ql 0 , false , no , off .",
        "An empty variable counts as unset (what compose files and templates write for",
        "values left out), except",
        ".Ev FORKSERVE_SERVER_HEADER ,",
        "where empty means no header.",
        ".Bl -tag -width Ds",
        ".It Ev " + APP_ENV,
        "The app, as the",
        ".Ar MODULE:VARIABLE",
        "argument.",
        ".It Ev " + CONFIG_ENV,
        "The configuration file, as",
        ".Fl c .",
        *environment_items(),
        *SYSTEMD_ENVIRONMENT.strip().splitlines(),
        ".It Ev " + INHERIT_ENV,
        "Set by",
        ".Nm",
        "itself for the new master of a",
        ".Dv SIGUSR2",
        "upgrade: the listening sockets it inherits.",
        "Not to be set by hand.",
        ".El",
    ]


SYSTEMD_ENVIRONMENT = r"""
.It Ev NOTIFY_SOCKET
Set by
.Xr systemd 1
for a service of
.Cm Type=notify
or
.Cm Type=notify-reload :
the master reports with
.Xr sd_notify 3
messages on this socket that it is ready
.Po
.Ql READY=1
and
.Ql MAINPID= ,
once every first worker has booted, and again when a reload is complete
.Pc ,
reloading
.Po
.Ql RELOADING=1 ,
on
.Dv SIGHUP
.Pc ,
stopping
.Pq Ql STOPPING=1 ,
and its status
.Po
.Ql STATUS= :
the workers booted and the requests served
.Pc .
.It Ev WATCHDOG_USEC , WATCHDOG_PID
Set by
.Xr systemd 1
when the service has
.Cm WatchdogSec= :
the master pings the watchdog
.Pq Ql WATCHDOG=1
at half that interval, but only while it is healthy: while its workers are heard from.
.It Ev LISTEN_FDS , LISTEN_PID , LISTEN_FDNAMES
Socket activation by
.Xr systemd.socket 5 :
when
.Ev LISTEN_PID
is the master's pid,
.Nm
serves the
.Ev LISTEN_FDS
sockets it was passed, from file descriptor 3, instead of binding any
.Pq Fl b No is then ignored .
The variables are removed from the environment, so that the workers and the app do not
misread them.
"""


FILES_1 = r"""
.Sh FILES
.Bl -tag -width Ds
.It Pa forkserve.toml
Settings, read from the working directory
.Po
or the
.Fl -chdir
directory
.Pc
when no
.Fl c
is given; see
.Xr forkserve.toml 5 .
.It Pa pyproject.toml
Its
.Ql [tool.forkserve]
table holds the same settings; read when there is no
.Pa forkserve.toml .
.It Pa FILE.py
A Python configuration file given with
.Fl c :
module-level names set settings, functions named after a server hook are called as
hooks; see
.Sx PYTHON CONFIGURATION FILES
in
.Xr forkserve.toml 5 .
.It Pa FILE , FILE.oldbin
The pid file given with
.Fl -pid ,
renamed
.Pa FILE.oldbin
during a
.Dv SIGUSR2
upgrade.
.El
"""

EXIT_STATUS_1 = r"""
.Sh EXIT STATUS
.Bl -tag -width Ds
.It 0
Stopped by a signal, cleanly
.Pq or Fl -check-config , Fl -version , Fl h .
.It 1
A runtime failure: an
.Ic on_starting
hook raised.
.It 2
Configuration: a bad option or value, a bad or busy address, an app module or attribute
that does not exist, a bad configuration file (one line on standard error).
.It 3
The app raised while being loaded, or a worker died or hung before loading it (the
traceback is in the error log, once).
.El
"""


def _examples_1() -> list[str]:
    return [
        ".Sh EXAMPLES",
        "Serve a WSGI app on all IPv4 addresses with four workers:",
    ] + literal_block(["$ forkserve -b 0.0.0.0:8000 -w 4 myapp:app"]) + [
        "Call an app factory with an argument:",
    ] + literal_block([
        "$ forkserve \"myapp:create_app('prod')\"",
    ]) + [
        "A Django project: the module alone looks for",
        ".Va application :",
    ] + literal_block(["$ forkserve --chdir /srv/mysite mysite.wsgi"]) + [
        "A FastAPI app (ASGI is detected) on uvloop, with access log on standard output:",
    ] + literal_block(["$ forkserve --loop uvloop --access-logfile - main:app"]) + [
        "Behind",
        ".Xr nginx 8",
        "on a unix socket, with a pid file:",
    ] + literal_block([
        "$ forkserve -b unix:/run/myapp.sock -p /run/myapp.pid myapp:app",
    ]) + [
        "Show the effective configuration and where each value comes from:",
    ] + literal_block(["$ FORKSERVE_WORKERS=8 forkserve --check-config myapp:app"]) + [
        "Upgrade the app's code, or",
        ".Nm",
        "itself, without refusing a connection: a new master and new workers start beside",
        "the old ones, then the old master lets its requests finish and leaves:",
    ] + literal_block([
        "$ kill -USR2 $(cat /run/myapp.pid)",
        "$ kill -TERM $(cat /run/myapp.pid.oldbin)",
    ]) + [
        "To keep a way back, stop only the old workers at first:",
    ] + literal_block([
        "$ kill -USR2 $(cat /run/myapp.pid)",
        "$ kill -WINCH $(cat /run/myapp.pid.oldbin)",
    ]) + [
        "Then either finish the upgrade by stopping the old master:",
    ] + literal_block([
        "$ kill -TERM $(cat /run/myapp.pid.oldbin)",
    ]) + [
        "Or roll back: the old master starts its workers again, and the new master stops:",
    ] + literal_block([
        "$ kill -HUP $(cat /run/myapp.pid.oldbin)",
        "$ kill -TERM $(cat /run/myapp.pid)",
    ])


SEE_ALSO_1 = r"""
.Sh SEE ALSO
.Xr forkserve.toml 5 ,
.Xr systemd.service 5 ,
.Xr systemd.socket 5 ,
.Xr nginx 8
"""


def sections() -> list[str]:
    """forkserve(1) from its SYNOPSIS on: the command, its options, signals, control socket,
    environment, files, exit statuses and examples, as mdoc lines (long text lines are
    wrapped later, by `mdoc.finish`)."""
    return [
        ".Sh SYNOPSIS",
        *_synopsis(),
        ".Sh DESCRIPTION",
        *DESCRIPTION_1.strip().splitlines(),
        *_options(),
        *SIGNALS.strip().splitlines(),
        *CONTROL.strip().splitlines(),
        *_environment(),
        *FILES_1.strip().splitlines(),
        *EXIT_STATUS_1.strip().splitlines(),
        *_examples_1(),
        *SEE_ALSO_1.strip().splitlines(),
    ]
