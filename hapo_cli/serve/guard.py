"""`python -m hapo_cli.serve.guard -- CMD...`: runs CMD in this process's group and ends the whole
group when its owner goes away, however it goes (return, Ctrl-C, an exception, SIGKILL).

The owner (`ServerProcess`) starts this guard as a session leader with a pipe on stdin and never
writes to it: stdin reaches EOF exactly when the owner's end closes, which the kernel does for a
SIGKILLed owner too. The guard then sends SIGTERM to its group (the server and every process the
server started), waits `HAPO_GUARD_GRACE_S` seconds, and sends SIGKILL to what is left, itself
included. If CMD exits first, the guard ends the group the same way and exits with CMD's code.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time


def _end_group(grace_s: float, child: subprocess.Popen) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the group's SIGTERM is not for the guard
    try:
        os.killpg(0, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.1)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.killpg(0, signal.SIGKILL)  # stragglers (engine-core children), then the guard itself


def main(argv: list[str]) -> int:
    if "--" not in argv:
        print("usage: python -m hapo_cli.serve.guard -- CMD...", file=sys.stderr)
        return 2
    cmd = argv[argv.index("--") + 1:]
    grace = float(os.environ.get("HAPO_GUARD_GRACE_S", "10"))
    child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    owner_gone = threading.Event()

    def watch() -> None:
        while sys.stdin.buffer.read(1024):
            pass
        owner_gone.set()

    threading.Thread(target=watch, daemon=True).start()
    while child.poll() is None and not owner_gone.is_set():
        time.sleep(0.2)
    code = child.poll()
    _end_group(grace, child)
    return 0 if code is None else code  # not reached: SIGKILL above ends the guard


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
