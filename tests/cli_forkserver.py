"""Start the CLI's processes warm: a test-only fork server for `run_cli`.

Each CLI process the suite starts spends ~0.65 CPU-s importing the same 1,200 modules (dlt,
pyarrow, pandas, sqlglot, ...) before it does anything, and the suite starts a few hundred of
them. This server imports them once per pytest worker, then forks a child per call. The child
is still a separate process running the console script's own entry point
(`pipelines.cli.entry`): its own argv, environment, working directory, stdout and stderr, exit
code, signal handlers and umask, so what a test checks is what the installed script does. What
it skips is the interpreter's start and the imports, which are not what these tests are about.

Not for tests of the start itself (the telemetry default, the wheel, the layout's import test,
anything under a different interpreter setting): `run_cli` starts those with a real exec, as it
does any call whose environment changes how Python starts (PYTHON*, locale), or whenever the
server is unavailable. `DODO_SEGMENT_TEST_EXEC=1` makes every call a real exec.

Protocol (one connection per call, over a Unix socket): the client sends a JSON request line
with the call's stdout and stderr as file descriptors (SCM_RIGHTS); the server forks a waiter,
which forks the CLI process, waits for it (killing it at the timeout) and answers one JSON line.
The server itself stays single-threaded and never runs a command, so every fork starts from the
same clean, imported state.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import select
import signal
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

# What `dodo-segment demo` imports (the run, the models, the emitter, the report) and the CLI's
# command modules. Importing a module runs no command and reads no setting: dlt reads its
# configuration at the first lookup, which happens in the child.
PRELOAD = (
    "dlt",
    "dlt.destinations",
    "dlt.destinations.impl.duckdb.duck",
    "dlt.extract",
    "dlt.normalize",
    "dlt.load",
    "dlt.pipeline.pipeline",
    "dlt.sources.helpers.rest_client",
    "duckdb",
    "numpy",
    "pandas",
    "pyarrow",
    "pyarrow.parquet",
    "sqlglot",
    "requests",
    "segment.analytics",
    "pipelines.cli",
    "pipelines.job",
    "pipelines.commands",
)
STARTUP_ENV = ("LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "PYTHONHOME", "VIRTUAL_ENV")
"""Besides PYTHON* and LD_*: environment that changes how an interpreter starts."""


def startup_env(env: dict[str, str]) -> dict[str, str]:
    """The part of an environment that a warm child cannot take on after the fork."""
    return {k: v for k, v in env.items() if k.startswith(("PYTHON", "LD_")) or k in STARTUP_ENV}


def _preload() -> None:
    import pkgutil

    for name in PRELOAD:
        importlib.import_module(name)
    import pipelines.commands

    for module in pkgutil.iter_modules(pipelines.commands.__path__, "pipelines.commands."):
        importlib.import_module(module.name)


def _run_child(request: dict, stdout_fd: int, stderr_fd: int) -> None:
    """In the forked CLI process: become the call, run the console script's entry, exit."""
    try:
        os.setpgid(0, 0)  # its own group, so a timeout kills what it started too
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(stdout_fd, 1)
        os.dup2(stderr_fd, 2)
        for fd in (null, stdout_fd, stderr_fd):
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        time.tzset()
        tempfile.tempdir = None  # found again from this call's TMPDIR, not the server's
        if request.get("umask") is not None:
            os.umask(request["umask"])
        sys.argv = [request["exe"], *request["args"]]
        sys.path[0] = os.path.dirname(request["exe"])  # a script's folder, as for the real one
        from pipelines.cli import entry

        entry()  # ends the process with os._exit
        code = 0
    except SystemExit as exc:  # argparse's usage errors and --help
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:  # what the interpreter prints for an uncaught exception
        traceback.print_exc()
        code = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def _wait(pid: int, timeout: float) -> tuple[int, bool]:
    """Wait for the CLI process; at the timeout kill its group. (exit code, timed out)."""
    pidfd = os.pidfd_open(pid)
    ready, _, _ = select.select([pidfd], [], [], timeout)
    timed_out = not ready
    if timed_out:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _, status = os.waitpid(pid, 0)
    os.close(pidfd)
    return os.waitstatus_to_exitcode(status), timed_out


def _serve_call(conn: socket.socket) -> None:
    """In the waiter: read the call, fork the CLI process, answer its exit code."""
    msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 2)
    data = bytearray(msg)
    while not data.endswith(b"\n"):
        more = conn.recv(1 << 20)
        if not more:
            raise ConnectionError("the request ended early")
        data += more
    request = json.loads(data)
    stdout_fd, stderr_fd = fds
    pid = os.fork()
    if pid == 0:
        conn.close()
        _run_child(request, stdout_fd, stderr_fd)
    os.close(stdout_fd)
    os.close(stderr_fd)
    code, timed_out = _wait(pid, request["timeout"])
    conn.sendall(json.dumps({"returncode": code, "timed_out": timed_out}).encode())


def serve(path: str) -> None:
    _preload()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # waiters reap themselves
    gc.collect()
    gc.freeze()  # the imported objects stay shared between the forks, not copied on write
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    parent = os.getppid()
    while True:
        if not select.select([listener], [], [], 1.0)[0]:
            if os.getppid() != parent:  # the pytest process is gone: so is the server
                return
            continue
        conn, _ = listener.accept()
        if os.fork() == 0:
            listener.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            code = 0
            try:
                _serve_call(conn)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        conn.close()


class ForkServer:
    """The client: one server per pytest process, started at the first call."""

    def __init__(self, folder: Path) -> None:
        import subprocess

        self.path = str(folder / "cli.sock")
        self.env = dict(os.environ)
        # One thread in the server, so that forking it is safe: numpy's BLAS pool and pyarrow's
        # jemalloc purger would otherwise each start one at import.
        server_env = {**self.env, "OPENBLAS_NUM_THREADS": "1"}
        server_env["JE_ARROW_MALLOC_CONF"] = "background_thread:false"
        with open(folder / "server.log", "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tests.cli_forkserver", self.path],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env=server_env,
                cwd=Path(__file__).resolve().parents[1],
            )
        line = self.process.stdout.readline() if self.process.stdout else ""
        if line.strip() != "ready":
            self.process.kill()
            raise RuntimeError("the CLI fork server did not start")

    def accepts(self, env: dict[str, str]) -> bool:
        """Whether a warm child can run with this environment (else: a real exec)."""
        return self.process.poll() is None and startup_env(env) == startup_env(self.env)

    def run(
        self, exe: str, args: list[str], env: dict[str, str], timeout: float, umask: int | None
    ) -> tuple[int, bytes, bytes]:
        """Run one CLI call in a warm child: (exit code, stdout, stderr), like subprocess.run."""
        import subprocess

        request = {
            "exe": exe, "args": args, "env": env, "cwd": os.getcwd(),
            "timeout": timeout, "umask": umask,
        }  # fmt: skip
        with (
            tempfile.TemporaryFile() as out,
            tempfile.TemporaryFile() as err,
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn,
        ):
            conn.connect(self.path)
            payload = json.dumps(request).encode() + b"\n"
            socket.send_fds(conn, [payload], [out.fileno(), err.fileno()])
            answer = b""
            while chunk := conn.recv(65536):
                answer += chunk
            reply = json.loads(answer)
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read(), err.read()
        if reply["timed_out"]:
            raise subprocess.TimeoutExpired([exe, *args], timeout, stdout, stderr)
        return reply["returncode"], stdout, stderr

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


def text(data: bytes) -> str:
    """Decode like subprocess.run(text=True): UTF-8 here, universal newlines."""
    return data.decode().replace("\r\n", "\n").replace("\r", "\n")


if __name__ == "__main__":
    serve(sys.argv[1])
