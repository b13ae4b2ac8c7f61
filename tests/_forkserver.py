"""Test-only: start `tests/_synthetic_cli.py` processes without paying for `import torch` in each.

    proc = spawn([sys.executable, SCRIPT, *args], env=env)   # instead of subprocess.Popen(...)

The subprocess tests (exact resume after SIGKILL, data-parallel training, sweeps) start about
fifty CLI processes, and each spent 2.5 of its ~4 s importing torch and vaelab. Here a server
process imports them once and forks a fresh process for each command; the command then runs as
`python _synthetic_cli.py ARGS` would (the script re-run as `__main__`, its own environment,
working folder and argv, stdin from /dev/null, the interpreter's normal exit), so it is a real
process in every way the tests look at: its own PID to signal, its exit status (-9 after
SIGKILL), its stdout and stderr, every file it writes.

Fork is safe because the server never runs a torch operation or starts a thread: it checks that
it has one thread after its imports, and says so, or the client falls back to subprocess.Popen.
Anything read while the interpreter and its libraries load (PYTHON*, OMP_*, MKL_*, LD_*, ...)
must be the same in the server as in the command: the client keeps one server per such
environment, started with it.
VAELAB_TEST_NO_FORKSERVER=1 makes every command a plain subprocess (to compare, or to rule the
server out when a subprocess test fails).

The processes torchrun starts for `vaelab train --nproc N` come from the same server: a forked
command finds the server's listening socket in VAELAB_TEST_FORKSERVER_SOCKET and points torchrun
at `_forkserver.py proxy ARGS`, a small process (no torch) that has the server fork
`_synthetic_cli.py ARGS` with its environment, folder and stdout/stderr, then stands in for it:
it passes on the signals torchrun sends (SIGTERM to the process group it made), and ends as the
command ended (its exit code, or the same signal). If the proxy dies (SIGKILL), the server kills
the command. A proxy whose environment differs from the server's in a load-time variable runs
the command itself (exec), as torchrun would have.

Protocol: the client sends the request as JSON over a Unix socket with three descriptors: the
files for stdout and stderr and the write end of a status pipe. The server forks a waiter, which
forks the command and writes "PID\\n" then, when it ends, "RETURNCODE\\n" into the status pipe.
A proxy sends the same request on a connection to the listening socket and reads "ok\\n" (forked)
or "no\\n" (run it yourself) back; the waiter watches that connection for the proxy's end.
"""

from __future__ import annotations

import io
import json
import locale
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "_synthetic_cli.py"
LOAD_TIME_PREFIXES = ("PYTHON", "OMP_", "MKL_", "KMP_", "GOMP_", "OPENBLAS_", "LD_", "TORCH_", "MALLOC_")
# Set by torchrun for its processes and read only when an NCCL group is made (these tests use gloo).
RUN_TIME_ONLY = ("TORCH_NCCL_ASYNC_ERROR_HANDLING",)
SOCKET_ENV = "VAELAB_TEST_FORKSERVER_SOCKET"  # set in each forked command: where proxies connect
# Modules a command imports on its way; importing them once here is the point of the server.
PRELOAD = ("vaelab.train", "vaelab.models", "vaelab.checkpoint", "vaelab.sweep", "vaelab.distributed",
           "vaelab.evaluate", "safetensors.torch")


# --- client ------------------------------------------------------------------------------------

def _load_time_env(env: dict[str, str]) -> tuple:
    return tuple(sorted((k, v) for k, v in env.items() if k.startswith(LOAD_TIME_PREFIXES) and k not in RUN_TIME_ONLY))


def _send_request(sock: socket.socket, request: dict, fds: list[int]) -> None:
    data = json.dumps(request).encode()
    sock.sendall(len(data).to_bytes(8, "big"))
    socket.send_fds(sock, [data], fds)


class _Server:
    def __init__(self, env: dict[str, str]):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.folder = tempfile.mkdtemp(prefix="vaelab-forkserver-")  # for the proxies' socket
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), str(theirs.fileno()),
                                      os.path.join(self.folder, "socket")],
                                     pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, cwd=HERE)
        theirs.close()
        self.sock, self.lock = ours, threading.Lock()
        self.ready = self.sock.recv(64) == b"ready\n"  # b"unsafe\n" (threads) or b"" (it failed)

    def spawn(self, args: list[str], env: dict[str, str], cwd: str) -> "ForkedProcess":
        out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        status_r, status_w = os.pipe()
        try:
            with self.lock:
                _send_request(self.sock, {"args": args, "env": env, "cwd": cwd}, [out.fileno(), err.fileno(), status_w])
        finally:
            os.close(status_w)
        return ForkedProcess(out, err, status_r)


_servers: dict[tuple, _Server] = {}
_servers_lock = threading.Lock()


def spawn(argv: list, env: dict[str, str] | None = None, cwd: str | os.PathLike | None = None):
    """`subprocess.Popen(argv, env=env, cwd=cwd, stdout=PIPE, stderr=PIPE, text=True)` for a
    command `python tests/_synthetic_cli.py ...`, forked from a server that has imported torch;
    a real Popen for anything else, or where the server could not be made safe."""
    env = dict(os.environ if env is None else env)
    argv = [str(a) for a in argv]
    popen = lambda: subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE,  # noqa: E731
                                     stderr=subprocess.PIPE, text=True)
    if len(argv) < 2 or argv[0] != sys.executable or Path(argv[1]).resolve() != SCRIPT \
            or os.environ.get("VAELAB_TEST_NO_FORKSERVER"):
        return popen()
    key = _load_time_env(env)
    with _servers_lock:
        server = _servers.get(key)
        if server is None:
            server = _servers[key] = _Server(env)
    if not server.ready:
        return popen()
    return server.spawn(argv[2:], env, str(cwd or os.getcwd()))


class ForkedProcess:
    """The parts of `subprocess.Popen` (text mode, stdout and stderr captured) the tests use."""

    def __init__(self, out, err, status_fd: int):
        self._out, self._err, self._status = out, err, status_fd
        self._buffer = b""
        self.returncode: int | None = None
        pid = self._read_line(timeout=300)
        if pid is None:
            raise RuntimeError("the fork server did not say the PID of the process it forked within 300 s")
        self.pid = int(pid)

    def _read_line(self, timeout: float | None) -> str | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self._status], [], [], left)[0]:
                return None
            chunk = os.read(self._status, 64)
            if not chunk:
                raise RuntimeError("the fork server's waiter ended without a status")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def poll(self) -> int | None:
        return self.wait(timeout=0, _raise=False)

    def wait(self, timeout: float | None = None, _raise: bool = True) -> int | None:
        if self.returncode is None:
            line = self._read_line(timeout)
            if line is None:
                if _raise:
                    raise subprocess.TimeoutExpired(f"forked {self.pid}", timeout)
                return None
            self.returncode = int(line)
            os.close(self._status)
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        return self._text(self._out), self._text(self._err)

    @staticmethod
    def _text(f) -> str:
        f.seek(0)  # decoded as Popen(text=True) does: locale encoding, universal newlines
        return io.TextIOWrapper(io.BytesIO(f.read()), encoding=locale.getpreferredencoding(False)).read()

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


Process = subprocess.Popen | ForkedProcess


# --- server ------------------------------------------------------------------------------------

def _recv_request(sock: socket.socket):
    size = b""
    while len(size) < 8:
        chunk = sock.recv(8 - len(size))
        if not chunk:
            return None
        size += chunk
    n = int.from_bytes(size, "big")
    data, fds, _, _ = socket.recv_fds(sock, n, 3)
    while len(data) < n:
        data += sock.recv(n - len(data))
    return json.loads(data), fds


def _run_command(request: dict, fds: list[int], listen_path: str) -> None:
    """In the forked command: become `python _synthetic_cli.py ARGS` and run it. Returns only by
    raising (SystemExit, KeyboardInterrupt, ...), which ends the process as the interpreter would."""
    import runpy

    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(fds[0], 1)
    os.dup2(fds[1], 2)
    for fd in (devnull, *fds):
        os.close(fd)
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ[SOCKET_ENV] = listen_path
    os.chdir(request["cwd"])
    sys.argv = [str(SCRIPT), *request["args"]]
    runpy.run_path(str(SCRIPT), run_name="__main__")


def _wait(pid: int, proxy: socket.socket | None) -> int:
    """The command's exit status; if its proxy's connection ends first (the proxy was killed),
    the command is killed too, as it would have been."""
    if proxy is None:
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if select.select([proxy], [], [], 0.05)[0] and not proxy.recv(1):
            os.kill(pid, signal.SIGKILL)
            return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _start(request: dict, fds: list[int], closing: list[socket.socket], listen_path: str,
           proxy: socket.socket | None = None) -> None:
    """Fork a waiter, which forks the command and reports its PID and exit status."""
    if os.fork() == 0:  # the waiter
        for s in closing:
            s.close()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        status_w = fds.pop()
        pid = os.fork()
        if pid == 0:
            os.close(status_w)
            if proxy is not None:
                proxy.close()
            _run_command(request, fds, listen_path)
            sys.exit(0)  # the script returned without sys.exit (it always calls it)
        for fd in fds:
            os.close(fd)
        os.write(status_w, f"{pid}\n".encode())
        os.write(status_w, f"{_wait(pid, proxy)}\n".encode())
        os._exit(0)
    for fd in fds:
        os.close(fd)


def serve(sock_fd: int, listen_path: str) -> None:
    sock = socket.socket(fileno=sock_fd)
    sys.path.insert(0, str(HERE))
    import importlib

    import _synthetic_cli  # noqa: F401  (torch, vaelab, the test helpers)

    for name in PRELOAD:
        importlib.import_module(name)
    if len(os.listdir("/proc/self/task")) != 1:
        sock.sendall(b"unsafe\n")
        return
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(listen_path)
    listener.listen(16)
    ours = _load_time_env(dict(os.environ))
    sock.sendall(b"ready\n")
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # waiters are reaped by the kernel
    while True:  # a forked command leaves this loop by an exception (SystemExit): nothing below runs for it
        readable = select.select([sock, listener], [], [])[0]
        if listener in readable:
            proxy = listener.accept()[0]
            received = _recv_request(proxy)
            if received is not None:
                request, fds = received
                same = _load_time_env(request["env"]) == ours
                proxy.sendall(b"ok\n" if same else b"no\n")
                if same:
                    _start(request, fds, [sock, listener], listen_path, proxy)
                else:
                    for fd in fds:
                        os.close(fd)
            proxy.close()
        if sock in readable:
            received = _recv_request(sock)
            if received is None:  # the test process closed its end: it has finished
                break
            _start(*received, [sock, listener], listen_path)
    os.unlink(listen_path)
    os.rmdir(os.path.dirname(listen_path))


# --- proxy -------------------------------------------------------------------------------------

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def proxy(args: list[str]) -> None:
    """`_forkserver.py proxy ARGS`, as torchrun starts it: `python _synthetic_cli.py ARGS`, forked
    by the server; this process forwards signals to it and ends as it ended."""
    path = os.environ.get(SOCKET_ENV)
    pending: list[int] = []
    target = {"pid": None}

    def forward(sig, frame):
        if target["pid"] is None:
            pending.append(sig)
        else:
            os.kill(target["pid"], sig)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    conn = None
    if path:
        env = dict(os.environ)
        env.pop(SOCKET_ENV)
        status_r, status_w = os.pipe()
        try:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.connect(path)
            _send_request(conn, {"args": args, "env": env, "cwd": os.getcwd()}, [1, 2, status_w])
            accepted = conn.recv(3) == b"ok\n"
        except OSError:  # no server (it ended with its test process)
            accepted = False
        os.close(status_w)
        if not accepted:
            conn.close()
            conn = None
    if conn is None:  # run it here, as torchrun would have
        for sig in FORWARDED:
            signal.signal(sig, signal.SIG_DFL)
        for sig in pending:  # one that came meanwhile ends this process, as it would have
            os.kill(os.getpid(), sig)
        os.execv(sys.executable, [sys.executable, str(SCRIPT), *args])
    status = ForkedProcess(None, None, status_r)
    target["pid"] = status.pid
    for sig in pending:
        os.kill(status.pid, sig)
    code = status.wait()
    if code >= 0:
        os._exit(code)
    signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
    os._exit(128 - code)


if __name__ == "__main__":
    if sys.argv[1] == "proxy":
        proxy(sys.argv[2:])
    else:
        serve(int(sys.argv[1]), sys.argv[2])
