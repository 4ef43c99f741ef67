"""Warm workers: a stage handed to a Python process that has already imported TensorFlow, Keras and MLflow.

Every stage process pays about 3.5 s before its first line of work: the interpreter, then
TensorFlow, Keras and MLflow imported. The warm loop (a head param changed, ``dvc exp run``) runs
three such stages (train, evaluate, export), so this fixed cost is about 10 s of it (bench/results.md,
"Warm loop"). ``make warm`` (``python -m pipeline.warm start``) starts one worker for the project,
which imports those libraries and waits on the socket ``SOCKET``. A stage started while it waits,
by ``dvc repro``, ``dvc exp run`` or by hand (``python -m pipeline.stages.<stage>``, the command
stays as it is), hands itself to the worker from ``pipeline/stages/__init__.py``: its module name,
working directory, environment, and its standard input, output and error themselves. The stage then
runs in the worker and prints where it would have printed, with the stage process's umask, CPUs
and signal handling. The stage process waits for the worker's exit status and exits with it; it
passes Ctrl-C and other signals on to the worker (not Ctrl-Z). A worker that dies without one (the
kernel's out-of-memory killer) ends the stage with exit status 1 and a line naming ``LOG``.

Each worker runs one stage and then exits. Beside the worker listening on the socket waits its
spare, a worker that has imported too. When the worker takes a stage, it hands the listening socket
to the spare, its successor for the next stage (a stage that comes meanwhile waits in the socket's
queue), which starts a spare of its own that imports while this stage works: a stage shorter than
the imports (evaluate: about 2 s) does not leave the next one waiting for its worker, as long as
the spare had its 3.5 s to import (two short stages in a row, or a stage right after ``make warm``,
can still wait). A spare that ends before it took the socket (out of memory) is replaced by a new
worker, which takes the socket. So a stage runs in a process as fresh as one of its own: the same
seed gives the same model (tests/test_one_model.py). The pipeline's own code is imported by the
stage, not before: an edited module takes effect at once. A worker refuses a stage from another
Python or folder, or whose environment differs from its own in anything but DVC's, make's and the
shell's per-run variables (``PER_RUN_VARIABLES``); the stage then runs in its own process, and a
successor with the stage's Python and environment takes over (the spare exits), so the next stage
is warm again. Only a process of the same user is answered (the socket's folder is private, and the
peer's user id is checked).

The last worker and its spare exit after ``--idle-minutes`` (``IDLE_MINUTES``) without a stage,
or at ``make cold`` (a spare still importing, once its imports are done). What each worker did is
appended to ``LOG``. A waiting worker holds about 0.5 GiB of memory, and so does its spare: about
1 GiB while idle, and besides a stage running in a worker. Written by hand (standard library only):
DVC runs each stage as a new process and has no persistent runner, and tools that pre-load
interpreters (e.g. nailgun) are for the JVM.
"""

import argparse
import atexit
import contextlib
import importlib
import io
import json
import os
import re
import runpy
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

from pipeline.cli import stage_name

# Relative to the project root, where DVC runs every stage (a Unix socket's path is limited to 107
# bytes, which a deep project folder could exceed); .dvc/tmp is DVC's own git-ignored scratch folder.
SOCKET = Path(".dvc/tmp/warm/worker.sock")
LOG = SOCKET.with_name("worker.log")
IDLE_MINUTES = 30.0
# What the TensorFlow stages import, the heavy part (the stages still import all they use themselves).
PRELOADED = (
    "tensorflow",
    "keras",
    "mlflow",
    "mlflow.pyfunc",
    "mlflow.store.tracking.sqlalchemy_store",
    "sklearn.linear_model",
    "sklearn.metrics",
    "matplotlib.pyplot",
    "PIL.Image",
)
# Environment variables that may differ between a worker's start and the stage it runs without
# changing what an import does: DVC's (DVC_EXP_NAME, ...), make's and the shell's bookkeeping (a prompt).
PER_RUN_VARIABLES = re.compile(r"DVC_\w*|MAKE\w*|MFLAGS|PWD|OLDPWD|SHLVL|PS[1-4]|_")
# The stages that import TensorFlow anyway (tests/test_warm.py checks): the others start in a fraction
# of a second, and a process that has imported TensorFlow is not one to fork worker pools from.
WARM_STAGES = ("augment", "features", "train", "evaluate", "export")
REPLY_TIMEOUT_S = 120  # a worker still importing answers within seconds; one that does not is stuck
RECEIVE_TIMEOUT_S = 10  # a stage process sends its request at once
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def log(message: str) -> None:
    print(stamped(message), file=sys.stderr, flush=True)


def stamped(message: str) -> str:
    return f"{time.strftime('%Y-%m-%d %H:%M:%S')} worker {os.getpid()}: {message}"


# --- the stage's side ----------------------------------------------------------------------------


def stage_module() -> str | None:
    """``pipeline.stages.train`` when this process was started as ``python -m pipeline.stages.train``
    with no further argument (``--help`` and refused arguments are answered by the stage itself)."""
    argv = sys.orig_argv
    if len(argv) != 3 or argv[1] != "-m" or not re.fullmatch(r"pipeline\.stages\.\w+", argv[2]):
        return None
    return argv[2]


def hand_over_stage() -> None:
    """Run this stage process's stage in the project's warm worker, if one is waiting, and exit with
    its exit status; return (the stage runs here) when there is none, or it refused the stage."""
    module = stage_module()
    if module is None or stage_name(module) not in WARM_STAGES or not SOCKET.exists():
        return
    umask = os.umask(0)
    os.umask(umask)
    request = {
        "module": module,
        "cwd": os.getcwd(),
        "executable": sys.executable,
        "prefix": sys.prefix,
        "env": dict(os.environ),
        "umask": umask,
        "cpus": sorted(os.sched_getaffinity(0)),
    }
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(REPLY_TIMEOUT_S)
    try:
        client.connect(str(SOCKET))
        socket.send_fds(client, [json.dumps(request).encode() + b"\n"], [0, 1, 2])
        replies = client.makefile("rb")
        reply = json.loads(replies.readline() or b"{}")
    except (OSError, ValueError):  # no worker behind a stale socket, or it went away: run here
        client.close()
        return
    if "pid" not in reply:
        client.close()
        return
    client.settimeout(None)
    exit_with_worker(reply["pid"], replies)


def exit_with_worker(pid: int, replies) -> NoReturn:
    """Wait for the worker ``pid`` running this stage, passing signals on to it, and exit as it did."""
    forwarded: list[int] = []

    def forward(signum, frame) -> None:
        forwarded.append(signum)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, forward)
    line = replies.readline()
    ended = json.loads(line) if line else {}
    if "exit" in ended:
        os._exit(ended["exit"])
    died_of = ended.get("signal") or (forwarded[-1] if forwarded else None)
    if died_of:  # as a stage process of its own would: killed by the signal
        signal.signal(died_of, signal.SIG_DFL)
        os.kill(os.getpid(), died_of)
    print(f"error: the warm worker (pid {pid}) running this stage died; its log: {LOG}", file=sys.stderr)
    os._exit(1)


# --- the worker's side ---------------------------------------------------------------------------


def serve(idle_minutes: float, listen_fd: int | None, spare_fd: int | None) -> None:
    """Import PRELOADED, then wait for one stage (or ``stop``) at SOCKET; exit when idle too long.
    A successor gets its predecessor's listening socket (``listen_fd``), so that SOCKET never goes
    missing between two workers: a stage that comes meanwhile waits in the socket's queue. A spare
    (``spare_fd``: its channel to the worker listening now) imports first, then waits for the socket."""
    own_env = dict(os.environ)
    started = time.monotonic()
    if spare_fd is not None:
        preload()
        log(f"spare ready in {time.monotonic() - started:.1f} s")
        listen_fd = wait_for_turn(socket.socket(fileno=spare_fd))
        if listen_fd is None:
            log("the worker before this spare stopped: exiting")
            return
    listening = (socket.socket(fileno=listen_fd), socket_inode()) if listen_fd is not None else listen()
    if listening is None:
        return
    listener, inode = listening
    if spare_fd is None:
        preload()
        log(f"ready in {time.monotonic() - started:.1f} s")
    spare = start_spare(own_env, idle_minutes)
    listener.settimeout(idle_minutes * 60)
    while True:
        try:
            connection, _ = listener.accept()
        except TimeoutError:
            log(f"idle for {idle_minutes:g} min: exiting")
            release(listener, inode)
            return  # the spare sees its channel close, and exits too
        fds: list[int] = []
        try:
            message, fds = receive(connection)
            stage = answer(connection, message, listener, inode, own_env, idle_minutes, spare)
        except (OSError, ValueError, KeyError, TypeError) as err:  # a client that went away or spoke nonsense
            log(f"dropped a request: {type(err).__name__}: {err}")
            connection.close()
            for fd in fds:  # its streams: held here, a pipe it writes to would never see its end
                os.close(fd)
            continue
        if stage == "done":
            return
        if stage == "run":
            run_stage(connection, message, fds, own_env)


def preload() -> None:
    for name in PRELOADED:
        importlib.import_module(name)
    # MLflow's map of the installed distributions (importlib.metadata.packages_distributions, ~0.5 s
    # of the train stage), read when a model is logged to check its requirements: made once, here.
    from mlflow.utils import requirements_utils

    requirements_utils._init_modules_to_packages_map()


def start_spare(env: dict[str, str], idle_minutes: float) -> socket.socket | None:
    """A worker with this one's Python and environment that imports now and takes the listening
    socket when this one takes a stage: a stage shorter than the imports (evaluate) does not leave
    the next one waiting for its worker. Returns this end of their channel (None: no spare started)."""
    ours, theirs = socket.socketpair()
    try:
        start_worker(sys.executable, env, idle_minutes, spare_fd=theirs.fileno())
    except OSError as err:  # no memory or processes left to fork: successors are started as needed
        log(f"no spare started ({err})")
        ours.close()
        return None
    finally:
        theirs.close()
    return ours


def wait_for_turn(channel: socket.socket) -> int | None:
    """The listening socket the worker before this spare hands over (acknowledged on the channel),
    or None when it closed their channel instead (stopped, idle, refused a stage, or died)."""
    with channel:
        try:
            _, fds, _, _ = socket.recv_fds(channel, 1, 1)
        except OSError:
            return None
        if not fds:
            return None
        os.set_inheritable(fds[0], False)
        with contextlib.suppress(OSError):  # the worker before may have ended since: the socket is ours all the same
            channel.sendall(b"A")
        return fds[0]


def hand_over(
    spare: socket.socket | None, listener: socket.socket, executable: str, env: dict[str, str], idle_minutes: float
) -> bool:
    """Pass the listening socket to the spare; False when there is none, or it has exited. The spare
    may still be importing: until it acknowledges, a thread of this process (soon the stage's) keeps
    a copy of the socket, and if the spare ends first (out of memory, say) starts a new worker
    (``executable``, ``env``) to take it."""
    if spare is None:
        return False
    try:
        socket.send_fds(spare, [b"L"], [listener.fileno()])
    except OSError:
        return False
    kept = listener.dup()
    args = (spare, kept, executable, env, idle_minutes, LOG.resolve())
    threading.Thread(target=see_it_taken, args=args, daemon=True).start()
    return True


def see_it_taken(
    spare: socket.socket, kept: socket.socket, executable: str, env: dict[str, str], idle_minutes: float, log_path: Path
) -> None:
    with spare, kept:
        try:
            taken = spare.recv(1) == b"A"
        except OSError:
            taken = False
        if not taken:
            with open(log_path, "a") as log_file:  # this process's stderr is the stage's by now
                print(stamped("the spare ended before it took the socket: a new worker takes it"), file=log_file)
            start_worker(executable, env, idle_minutes, listen_fd=kept.fileno())


def answer(
    connection: socket.socket,
    message: dict,
    listener: socket.socket,
    inode: int,
    own_env: dict,
    idle_minutes: float,
    spare: socket.socket | None,
) -> str:
    """Answer one request: "run" (the stage is this worker's), "done" (stopped, or a successor took
    over) or "next" (keep waiting)."""
    if message.get("stop"):
        log("stopped")
        release(listener, inode)
        reply(connection, {"stopped": os.getpid()})
        return "done"
    if "module" not in message:  # `start` waiting for this worker to be ready
        reply(connection, {"ready": os.getpid()})
        connection.close()
        return "next"
    refusal = mismatch(message, own_env)
    # The successor for the next stage: the spare, or after a refusal a new worker with this stage's
    # Python and environment, so that the next stage like this one is warm.
    if refusal or not hand_over(spare, listener, message["executable"], message["env"], idle_minutes):
        start_worker(message["executable"], message["env"], idle_minutes, listen_fd=listener.fileno())
        if spare is not None:
            spare.close()  # the spare sees its channel close, and exits
    listener.close()
    if refusal:
        log(f"refused {message['module']}: {refusal}; its successor starts with the stage's environment")
        reply(connection, {"refused": refusal})
        return "done"
    return "run"


def reply(connection: socket.socket, message: dict) -> None:
    connection.sendall(json.dumps(message).encode() + b"\n")


def listen() -> tuple[socket.socket, int] | None:
    """The listening socket at SOCKET and the socket file's inode, or None when another worker
    already listens there."""
    SOCKET.parent.mkdir(parents=True, exist_ok=True)
    SOCKET.parent.chmod(0o700)  # whoever can connect runs stages as this user (receive checks it again)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(SOCKET))
    except OSError:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(SOCKET))
            log("another worker is waiting: exiting")
            return None
        except OSError:  # a socket file left by a worker that was killed
            SOCKET.unlink(missing_ok=True)
            listener.bind(str(SOCKET))
        finally:
            probe.close()
    listener.listen(8)
    return listener, socket_inode()


def socket_inode() -> int:
    """SOCKET's inode, or -1 when it is gone (a user removed .dvc/tmp)."""
    try:
        return SOCKET.stat().st_ino
    except FileNotFoundError:
        return -1


def release(listener: socket.socket, inode: int) -> None:
    """Stop listening and remove SOCKET (the file of inode ``inode``), unless another worker's is there now."""
    if socket_inode() == inode:
        SOCKET.unlink(missing_ok=True)
    listener.close()


def receive(connection: socket.socket) -> tuple[dict, list[int]]:
    """A request (one JSON line) and the file descriptors sent with it, from a process of this user."""
    connection.settimeout(RECEIVE_TIMEOUT_S)
    uid = struct.unpack("3i", connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[1]
    if uid != os.getuid():
        raise ValueError(f"a request from user id {uid}")
    data, fds, _, _ = socket.recv_fds(connection, 1 << 20, 3)
    try:
        while data and not data.endswith(b"\n"):
            more = connection.recv(1 << 20)
            if not more:
                break
            data += more
        connection.settimeout(None)
        message = json.loads(data) if data.strip() else {}
        if "module" in message and (stage_name(message["module"]) not in WARM_STAGES or len(fds) != 3):
            raise ValueError(f"not a stage this worker runs: {message['module']}")
    except (OSError, ValueError):
        for fd in fds:
            os.close(fd)
        raise
    return message, fds


def mismatch(message: dict, own_env: dict[str, str]) -> str:
    """Why this worker cannot run the stage as its own process would, or ''."""
    # .venv/bin/python and .venv/bin/python3 are one Python: the same interpreter in the same environment.
    if (os.path.realpath(message["executable"]), message["prefix"]) != (os.path.realpath(sys.executable), sys.prefix):
        return f"another Python ({message['executable']})"
    if not os.path.samefile(message["cwd"], "."):
        return f"another folder ({message['cwd']})"
    env = message["env"]
    differ = sorted(
        k for k in env.keys() | own_env.keys() if env.get(k) != own_env.get(k) and not PER_RUN_VARIABLES.fullmatch(k)
    )
    return f"environment variables differ: {', '.join(differ)}" if differ else ""


def start_worker(
    executable: str, env: dict[str, str], idle_minutes: float, listen_fd: int | None = None, spare_fd: int | None = None
) -> None:
    """A new worker in its own session (a stage's Ctrl-C is not its), logging to LOG; ``listen_fd``:
    the listening socket it takes over; ``spare_fd``: it is a spare, and this its channel."""
    LOG.parent.mkdir(parents=True, exist_ok=True)
    command = [executable, "-m", "pipeline.warm", "serve", "--idle-minutes", str(idle_minutes)]
    passed = {"--listen-fd": listen_fd, "--spare-fd": spare_fd}
    with open(LOG, "a") as log_file:
        subprocess.Popen(
            [*command, *(part for flag, fd in passed.items() if fd is not None for part in (flag, str(fd)))],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            start_new_session=True,
            pass_fds=[fd for fd in passed.values() if fd is not None],
        )


def run_stage(connection: socket.socket, message: dict, fds: list[int], own_env: dict[str, str]) -> NoReturn:
    """Become the stage process: its standard streams, environment, umask, CPUs and signal handling,
    its module run as ``__main__``; report its exit status and exit."""
    module, pid, started, log_path = message["module"], os.getpid(), time.monotonic(), LOG.resolve()
    reply(connection, {"pid": pid})
    log(f"runs {module}")
    threading.Thread(target=die_with_stage_process, args=(connection,), daemon=True).start()
    os.register_at_fork(after_in_child=connection.close)  # the stage's own children do not report
    real_exit = os._exit

    def report(ending: dict) -> None:
        with contextlib.suppress(OSError):
            with open(log_path, "a") as log_file:  # this process's stderr is the stage's
                how = f"exited {ending['exit']}" if "exit" in ending else f"died of signal {ending['signal']}"
                print(stamped(f"{module} {how} after {time.monotonic() - started:.1f} s"), file=log_file)
            reply(connection, ending)

    def exit_reporting(status: int) -> NoReturn:  # every way out of the stage ends here (cli.exit_without_teardown too)
        if os.getpid() == pid:  # not a process the stage forked
            report({"exit": status})
        real_exit(status)

    os._exit = exit_reporting
    code, died_of = 0, 0
    try:
        become_stage_process(message, fds, own_env)
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as end:
        code = exit_code(end)
    except KeyboardInterrupt:  # as Python ends on one: the traceback, the exit handlers, then death by SIGINT
        traceback.print_exc()
        died_of = signal.SIGINT
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    threading._shutdown()  # type: ignore[attr-defined]  # as the interpreter exits: pools' exit hooks, then a join of the threads left
    atexit._run_exitfuncs()
    with contextlib.suppress(OSError):
        sys.stdout.flush()
        sys.stderr.flush()
    if died_of:
        report({"signal": died_of})
        signal.signal(died_of, signal.SIG_DFL)
        os.kill(pid, died_of)
    os._exit(code)


def become_stage_process(message: dict, fds: list[int], own_env: dict[str, str]) -> None:
    """This process, as a stage process of its own would be, before the stage's module runs."""
    # The stage's environment, plus what the imports added (as they would have in its own process).
    imported = {k: v for k, v in os.environ.items() if k not in own_env}
    os.environ.clear()
    os.environ.update({**imported, **message["env"]})
    os.chdir(message["cwd"])
    sys.executable = message["executable"]
    os.umask(message["umask"])
    os.sched_setaffinity(0, message["cpus"])  # TensorFlow sizes its thread pools by them
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for signum in FORWARDED_SIGNALS[1:]:
        signal.signal(signum, signal.SIG_DFL)
    sys.stdout.flush()
    sys.stderr.flush()
    for stream, fd in zip((0, 1, 2), fds):
        os.dup2(fd, stream)
        os.close(fd)
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    if isinstance(sys.stdout, io.TextIOWrapper):  # as Python sets it up for a process of its own
        sys.stdout.reconfigure(line_buffering=unbuffered or sys.stdout.isatty(), write_through=unbuffered)
    for name in [m for m in sys.modules if m == "pipeline" or m.startswith("pipeline.")]:
        del sys.modules[name]  # the stage imports the pipeline's code as it is now
    sys.argv = ["-m"]


def exit_code(end: SystemExit) -> int:
    """The exit status Python gives ``sys.exit(arg)``: a message is printed and means 1."""
    if end.code is None or isinstance(end.code, int):
        return end.code or 0
    print(end.code, file=sys.stderr)
    return 1


def die_with_stage_process(connection: socket.socket) -> None:
    """The stage process never writes after its request: end of file means it was killed, and the
    stage dies with it, as it would have."""
    with contextlib.suppress(OSError):
        connection.recv(1)
    os.kill(os.getpid(), signal.SIGKILL)


# --- make warm / make cold -----------------------------------------------------------------------


def start(idle_minutes: float) -> int | None:
    """Start a worker for the project, unless one waits already; its pid once it is ready, or None
    when none answered within REPLY_TIMEOUT_S."""
    started = time.monotonic()
    start_worker(sys.executable, dict(os.environ), idle_minutes)
    while time.monotonic() - started < REPLY_TIMEOUT_S:
        ready = ask({"ready?": True}).get("ready")
        if ready:
            print(
                f"warm worker {ready} ready in {time.monotonic() - started:.1f} s: the stages {', '.join(WARM_STAGES)} "
                f"run in warm workers until {idle_minutes:g} min pass without one, or `make cold` (log: {LOG})"
            )
            return ready
        time.sleep(0.2)
    return None


@contextlib.contextmanager
def kept_warm() -> Iterator[None]:
    """Warm workers while the block runs (``make exp``'s grid): one is started unless one waits
    already, and stopped afterwards unless it was already waiting. Without one, the stages run as usual."""
    waiting = "ready" in ask({"ready?": True})
    if not waiting and start(IDLE_MINUTES) is None:
        print(f"no warm worker started (see {LOG}): the stages start their own processes")
    try:
        yield
    finally:
        if not waiting:
            stop()


def ask(message: dict) -> dict:
    """Send ``message`` to the worker at SOCKET: its reply, or {} when none answers."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(REPLY_TIMEOUT_S)
    try:
        client.connect(str(SOCKET))
        client.sendall(json.dumps(message).encode() + b"\n")
        return json.loads(client.makefile("rb").readline() or b"{}")
    except (OSError, ValueError):
        return {}
    finally:
        client.close()


def stop() -> None:
    reply = ask({"stop": True})
    print(f"stopped the warm worker {reply['stopped']}" if "stopped" in reply else "no warm worker was waiting")


def minutes(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of minutes")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("start", "stop", "serve"), help="serve: be the worker (start runs it)")
    parser.add_argument(
        "--idle-minutes", type=minutes, default=IDLE_MINUTES, help="exit after this long without a stage"
    )
    parser.add_argument("--listen-fd", type=int, help="serve: the listening socket, from the predecessor")
    parser.add_argument("--spare-fd", type=int, help="serve: be a spare; its channel to the listening worker")
    args = parser.parse_args()
    if args.action == "start":
        if start(args.idle_minutes) is None:
            sys.exit(f"error: no warm worker answered within {REPLY_TIMEOUT_S} s; see {LOG}")
    elif args.action == "stop":
        stop()
    else:
        serve(args.idle_minutes, args.listen_fd, args.spare_fd)
        sys.stderr.flush()
        os._exit(0)  # at once: tearing down TensorFlow takes a second, and `stop` has been answered


if __name__ == "__main__":
    main()
