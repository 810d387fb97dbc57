"""Exec a command with fds renumbered from 3, the way systemd passes LISTEN_FDS.

    python listen_exec.py NAME=FD [NAME=FD ...] -- COMMAND [ARGS...]

Sets LISTEN_PID to our own pid (exec keeps it), LISTEN_FDS and LISTEN_FDNAMES.
"""

import fcntl
import os
import sys


def main() -> None:
    sep = sys.argv.index("--")
    pairs = [spec.rsplit("=", 1) for spec in sys.argv[1:sep]]
    command = sys.argv[sep + 1 :]
    # Move every source out of the 3..3+n range first, so no dup2 overwrites a source not yet moved.
    high = [fcntl.fcntl(int(fd), fcntl.F_DUPFD_CLOEXEC, 1000) for _, fd in pairs]
    for _, fd in pairs:
        os.close(int(fd))
    for i, fd in enumerate(high):
        os.dup2(fd, 3 + i, inheritable=True)
        os.close(fd)
    env = dict(os.environ)
    env.update(
        LISTEN_PID=str(os.getpid()),
        LISTEN_FDS=str(len(pairs)),
        LISTEN_FDNAMES=":".join(name for name, _ in pairs),
    )
    os.execvpe(command[0], command, env)


if __name__ == "__main__":
    main()
