"""Run a daemon (slurmd) under a child subreaper that reaps its orphans at once.

    python3 .ci/subreaper.py slurmd -f slurm.conf -N ct1

Exits with the command's own exit status once the command has exited (a daemon: once it has
forked into the background), so a caller sees a failed start as before; a detached process
stays behind as the subreaper of everything the command left running, and ends when that has.

Why (.ci/slurm_up.sh): proctrack/pgid ends a step, and the batch step, only once its process
group is empty, polling with a back-off of 1, 2, 4 ... s, and a zombie still counts. A job's
processes orphan some of theirs (srun's shepherd, megatron-core's checkpoint helpers); orphans go
to PID 1, which on a CI VM or in a container may reap them seconds late, or never. Every job's
end then waits 3 to 7 s more. Orphans of the daemon's descendants come here instead.
"""

from __future__ import annotations

import ctypes
import os
import sys

PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: subreaper.py COMMAND [ARGS...]", file=sys.stderr)
        return 2
    ready_r, ready_w = os.pipe()
    if os.fork():  # the caller's process: the command's status, once it is known
        os.close(ready_w)
        status = os.read(ready_r, 16)
        return int(status) if status else 1
    os.close(ready_r)
    os.setsid()  # out of the caller's session and process group: a shell's job control leaves it alone
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        os.write(ready_w, b"1")
        os._exit(1)
    command = os.fork()
    if command == 0:
        os.close(ready_w)
        try:
            os.execvp(argv[0], argv)
        except OSError as e:
            print(f"subreaper.py: {argv[0]}: {e.strerror}", file=sys.stderr)
            os._exit(127)
    _, status = os.waitpid(command, 0)
    os.write(ready_w, str(os.waitstatus_to_exitcode(status) & 0xFF).encode())
    os.close(ready_w)
    devnull = os.open(os.devnull, os.O_RDWR)  # the caller's output may be a pipe it reads to the end
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    while True:  # the daemon and every orphan of its descendants, until none is left
        try:
            os.wait()
        except ChildProcessError:
            os._exit(0)
        except InterruptedError:
            continue


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
