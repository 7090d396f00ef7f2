"""``attnlab dashboard [RUNS_DIR]``: start the Streamlit dashboard on a folder of run directories.

It runs ``python -m streamlit run <attnlab.app>/dashboard.py -- RUNS_DIR`` headless, bound to
127.0.0.1 unless ``--host`` says otherwise (the dashboard reads local files: exposing it on a
network is a choice to make explicitly).
"""

from __future__ import annotations

import argparse
import errno
import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

from attnlab.cliargs import positive_int
from attnlab.errors import AttnlabError

DASHBOARD = Path(__file__).with_name("dashboard.py")

_ERR_NO_DIR = "runs folder {path} does not exist: give a folder of run directories (e.g. `attnlab dashboard runs`), or create a run with `attnlab profile --model smollm2-135m --out {path}/demo`"
_ERR_NOT_DIR = "{path} is a file, not a folder of run directories: give the folder that holds the runs (e.g. its parent)"
_ERR_PORT = "--port must be between 1 and 65535, got {port}"
_ERR_PORT_BUSY = "port {port} on {host} is already in use (another dashboard?), so nothing was started: stop that server, or pick another port, e.g. --port {next}"
_ERR_HOST = "cannot serve on --host {host} ({reason}): give an address of this machine, e.g. 127.0.0.1"
_ERR_NO_STREAMLIT = "streamlit is not installed in this Python ({python}): install it with `{python} -m pip install streamlit`"


def port_number(text: str) -> int:
    """A TCP port, 1 to 65535 (``--port``)."""
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(_ERR_PORT.format(port=text))
    return value


#: Addresses that serve this machine only.
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def check_port(host: str, port: int) -> None:
    """`AttnlabError` unless a server can listen on ``host:port`` now: the port is taken, or
    ``host`` is not an address of this machine. (Binds a socket for a moment; starts nothing.)"""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise AttnlabError(_ERR_HOST.format(host=host, reason=exc)) from None
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise AttnlabError(_ERR_PORT_BUSY.format(host=host, port=port, next=port + 1 if port < 65535 else port - 1)) from None
            raise AttnlabError(_ERR_HOST.format(host=host, reason=exc.strerror or exc)) from None


def dashboard_command(runs_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8501) -> list[str]:
    """The command line that serves the dashboard on ``runs_dir`` (checked; nothing started)."""
    runs = Path(runs_dir)
    if not runs.exists():
        raise AttnlabError(_ERR_NO_DIR.format(path=runs))
    if not runs.is_dir():
        raise AttnlabError(_ERR_NOT_DIR.format(path=runs))
    if not 0 < int(port) < 65536:
        raise AttnlabError(_ERR_PORT.format(port=port))
    if importlib.util.find_spec("streamlit") is None:
        raise AttnlabError(_ERR_NO_STREAMLIT.format(python=sys.executable))
    return [
        sys.executable, "-m", "streamlit", "run", str(DASHBOARD),
        "--server.address", host, "--server.port", str(int(port)), "--server.headless", "true",
        "--browser.gatherUsageStats", "false", "--client.toolbarMode", "viewer",
        "--", str(runs.resolve()),
    ]


def _cmd_dashboard(args: argparse.Namespace) -> int:
    if args.host not in LOOPBACK:
        print(f"warning: --host {args.host} lets anyone who can reach this machine browse {args.runs_dir} and run "
              "the model on their own text in the head inspector; there is no login. Use 127.0.0.1 unless you mean it.",
              file=sys.stderr, flush=True)
    cmd = dashboard_command(args.runs_dir, args.host, args.port)
    check_port(args.host, args.port)  # before saying where it serves
    print(f"attnlab dashboard on {args.runs_dir}: http://{args.host}:{args.port}  (Ctrl-C stops it)", flush=True)
    env = {**os.environ, "ATTNLAB_RUNS_DIR": cmd[-1]}
    if os.name == "posix":
        # become the server: a signal that stops `attnlab dashboard` then stops Streamlit too,
        # instead of leaving it running without its parent
        os.execve(cmd[0], cmd, env)
    try:
        return subprocess.call(cmd, env=env)
    except KeyboardInterrupt:
        return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``dashboard``."""
    p = subparsers.add_parser(
        "dashboard",
        help="explore heads, design policies and read validations in a browser (Streamlit)",
        description="Serve the attnlab dashboard on a folder of run directories: runs (and a two-run compare), "
        "head atlas, head inspector, policy studio, validation, retrieval heads, head families, circuits. "
        "It reads what the CLI stored; only the head inspector runs the run's model, on a prompt you choose.",
    )
    p.add_argument("runs_dir", nargs="?", default="runs", metavar="RUNS_DIR", help="folder of run directories (default: runs)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=port_number, default=8501, help="port (default 8501)")
    p.set_defaults(func=_cmd_dashboard)
