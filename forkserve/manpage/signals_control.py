"""The SIGNALS and CONTROL sections of forkserve(1): how a running server is told what to do,
by signals to the master and by `forkserve ctl` on its control socket.

Hand-written prose; forkserve/manpage/forkserve_1.py puts it in the page.
"""

SIGNALS = r"""
.Sh SIGNALS
Signals are sent to the master; they have gunicorn's and unicorn's meanings.
.Bl -tag -width Ds
.It Dv SIGTERM
Graceful stop (after
.Fl -drain-delay ,
if set, and a second
.Dv SIGTERM
ends that delay): the listening sockets close, workers finish the requests in flight
(open connections get one more second to bring a request, answered with
.Ql Connection: close ) ,
then exit; whatever is still running after
.Fl -graceful-timeout
is killed.
.It Dv SIGINT , SIGQUIT
Quick stop: workers exit at once
.Pq Dv SIGKILL No after 5 seconds .
.It Dv SIGHUP
Reload: re-read the command line and the configuration file, start a full set of new
workers (which load the app's code anew), and stop the old ones only once the new ones
have booted.
If the new code cannot boot, the error is logged once, the old workers go on serving and
the boot is retried with backoff
.Po
with
.Fl -reload ,
not retried: the next change reloads
.Pc .
A logging configuration that cannot be applied leaves everything as it was.
.It Dv SIGTTIN , SIGTTOU
One worker more, one worker fewer (never below 1).
.It Dv SIGUSR1
Reopen the log files (after
.Xr logrotate 8
moved them) in the master and the workers, those of a
.Fl -log-config
too.
Files the server opened as root before
.Fl -user
took effect are handed to that user, so that they can still be reopened; a file moved
away is created again if the user may write to its directory.
.It Dv SIGUSR2
Upgrade: start a new master from the same Python and arguments that inherits the
listening sockets (nothing is bound again, no connection is refused); the pid file
becomes
.Pa FILE.oldbin .
Then stop the old master with
.Dv SIGTERM ,
or first its workers with
.Dv SIGWINCH
to keep a way back
.Pq see Sx EXAMPLES .
Under systemd
.Pq Ev NOTIFY_SOCKET
the new master, once ready, announces
.Ql MAINPID=
and stops the old one itself.
.It Dv SIGWINCH
Stop every worker but keep the master, so that a
.Dv SIGUSR2
upgrade can be rolled back
.Po
.Dv SIGHUP
starts the workers again
.Pc .
Ignored when the master runs in the foreground of a terminal, where it means a window
resize.
.El
"""


CONTROL = r"""
.Sh CONTROL
With
.Fl -control-socket ,
.Nm Cm ctl
asks the running server, as its user or root:
.Bd -literal -offset indent
forkserve ctl [--socket PATH] [-c FILE] [--json] COMMAND [ARGUMENT]
.Ed
.Pp
The socket is
.Fl -socket ,
else the server's own setting (its configuration file or environment), else the default
path.
Commands:
.Cm status
(the master and a row per worker),
.Cm stats
(requests by status, durations, refusals, connections),
.Cm reload ,
.Cm scale Ar N ,
.Cm incr ,
.Cm decr ,
.Cm reopen-logs ,
.Cm stop Op Ar graceful | quick ,
.Cm dump
(every worker's tracebacks to the error log).
While the server stops or drains, the commands that stand for a signal other than TERM and
QUIT answer an error, as those signals are ignored then.
.Fl -json
prints the answer as it came.
The exit status is 0 when the server did it, 1 when it answered an error or cannot be
reached, 2 for a usage error.
The socket speaks newline-delimited JSON: a line
.Ql {\(dqcommand\(dq: \(dqscale\(dq, \(dqworkers\(dq: 4}
is answered by a line
.Ql {\(dqok\(dq: true, \(dqworkers\(dq: 4}
or
.Ql {\(dqok\(dq: false, \(dqerror\(dq: \(dq...\(dq} .
"""
