"""`python -m jaxsae.launch -n N [--cpu-devices K] -- COMMAND key=value ...`: N local processes of one job.

Each process runs COMMAND with `coordinator=127.0.0.1:PORT num_processes=N process_id=I` appended (and
`cpu_devices=K`), on a free port. Output is streamed line by line with a `[I]` prefix. The launcher returns
the first non-zero exit code and stops the other processes (SIGTERM, then SIGKILL); 0 when all succeed.
For tests and single-machine multi-GPU use; on a pod or cluster the scheduler starts the processes instead.
Package commands such as `jaxsae ...` run with this interpreter (`python -m jaxsae.cli ...`).
"""
from __future__ import annotations

import argparse
import importlib.util
import socket
import subprocess
import sys
import threading
import time

GRACE_S = 10  # seconds the other processes get to exit after SIGTERM


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(cmd: list[str]) -> list[str]:
    """A package's console command (`jaxsae`, `lime_jax`: any PKG with a PKG.cli module) runs on this interpreter."""
    if cmd and cmd[0].isidentifier() and importlib.util.find_spec(cmd[0]) and importlib.util.find_spec(f"{cmd[0]}.cli"):
        return [sys.executable, "-m", f"{cmd[0]}.cli", *cmd[1:]]
    return cmd


def _pump(i: int, stream, out) -> None:
    for line in iter(stream.readline, ""):
        out.write(f"[{i}] {line}")
        out.flush()


def launch(n: int, cmd: list[str], cpu_devices: int = 0, port: int = 0) -> int:
    """Run `cmd` as processes 0..n-1 of one job; the first non-zero exit code, or 0."""
    if n < 1 or not cmd:
        raise ValueError(f"need -n >= 1 and a command, got -n {n} and {cmd}")
    addr = f"127.0.0.1:{port or free_port()}"
    extra = [f"coordinator={addr}", f"num_processes={n}"] + ([f"cpu_devices={cpu_devices}"] if cpu_devices else [])
    procs, pumps = [], []
    for i in range(n):
        p = subprocess.Popen(_command(cmd) + extra + [f"process_id={i}"], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, bufsize=1)
        procs.append(p)
        pumps.append(threading.Thread(target=_pump, args=(i, p.stdout, sys.stdout), daemon=True))
        pumps[-1].start()
    code = 0
    try:
        while any(p.poll() is None for p in procs):
            failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if failed:
                code = failed[0]
                break
            time.sleep(0.1)
        code = code or next((p.returncode for p in procs if p.returncode), 0)
    except KeyboardInterrupt:
        code = 130
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.time() + GRACE_S
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for t in pumps:
            t.join(timeout=5)
    if code:
        print(f"[launch] a process exited with code {code}; the others were stopped", file=sys.stderr, flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxsae.launch", description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--num-processes", type=int, required=True, help="processes to start")
    parser.add_argument("--cpu-devices", type=int, default=0, help="CPU devices per process (0: JAX's default)")
    parser.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command and its key=value options")
    args = parser.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    return launch(args.num_processes, cmd, args.cpu_devices, args.port)


if __name__ == "__main__":
    sys.exit(main())
