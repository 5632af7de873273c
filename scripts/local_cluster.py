"""A real one-machine Slurm (two nodes) and a local Ray head, for the launcher tests and for
trying `hapo ablate --launcher slurm|ray` on a laptop.

    python scripts/local_cluster.py slurm   # prints the SLURM_CONF to export; Ctrl-C stops it
    python scripts/local_cluster.py ray     # prints the Ray address
    python scripts/local_cluster.py stop DIR   # stop what a killed owner left (pids in DIR/pids)

Slurm: installs Debian's slurm-wlm and munge when missing (root, apt-get), then starts munged
(as the munge user, its own socket), slurmctld and two slurmd (`-N n1`, `-N n2`, NodeAddr
127.0.0.1, ports of their own) in the foreground, each in its own process group, state and
logs under a temporary folder. Ray: `ray start --head --block` on loopback
(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, else Ray binds the external address). Each owner is a
context manager: it stops what it started by pid (process group) on exit, on an exception and
on Ctrl-C/SIGTERM, and writes the pids to <dir>/pids so that `stop` finds a leftover.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check, deadline_s: float, log: Path | None = None) -> None:
    """Poll `check()` until true; after `deadline_s`, one line naming what did not answer."""
    end = time.time() + deadline_s
    while time.time() < end:
        if check():
            return
        time.sleep(0.2)
    tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log and log.exists() else []
    raise RuntimeError(f"{what} did not come up within {deadline_s:.0f} s"
                       + (f" (last log line: {tail[0]})" if tail else ""))


def stop_pids(pids: list[int], grace_s: float = 10) -> None:
    """SIGTERM each process group, then SIGKILL what is left after `grace_s`."""
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    end = time.time() + grace_s
    for pid in pids:
        while time.time() < end and _alive(pid):
            time.sleep(0.1)
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


def _alive(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class _Owner:
    """Starts processes in their own process groups; stops them all on exit."""

    def __init__(self, root: Path | None, prefix: str) -> None:
        self.created = root is None
        self.root = Path(root or tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        self.procs: list[subprocess.Popen] = []
        self._old: dict = {}

    def start(self, cmd: list[str], log: str, env: dict | None = None) -> subprocess.Popen:
        out = open(self.root / log, "ab")  # noqa: SIM115 - the child holds it
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()
        self.procs.append(proc)
        (self.root / "pids").write_text("\n".join(str(p.pid) for p in self.procs) + "\n")
        return proc

    def __enter__(self):
        def stop(signum, frame):
            raise KeyboardInterrupt

        if threading_main():
            self._old = {s: signal.signal(s, stop) for s in (signal.SIGTERM,)}
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()
        for s, h in self._old.items():
            signal.signal(s, h)
        if exc[0] is None and self.created:  # kept after an error: its logs say what failed
            shutil.rmtree(self.root, ignore_errors=True)

    def up(self) -> None:
        raise NotImplementedError

    def down(self) -> None:
        stop_pids([p.pid for p in reversed(self.procs)])
        (self.root / "pids").unlink(missing_ok=True)


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def ensure_slurm_installed() -> None:
    if shutil.which("slurmctld") and shutil.which("munged"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise RuntimeError("Slurm is not installed and cannot be here (needs root and apt-get): "
                           "apt-get install slurm-wlm munge")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"], check=True,
                   env=env, capture_output=True)


class SlurmCluster(_Owner):
    """munged + slurmctld + two slurmd (nodes n1, n2) on this machine. `env` points clients
    at it (SLURM_CONF)."""

    def __init__(self, root: Path | None = None, cpus: int | None = None) -> None:
        super().__init__(root, "hapo-slurm-")
        self.cpus = cpus or os.cpu_count() or 1
        # a requeued job waits cred_expire + 1 s before it may start again (Slurm's default
        # 120 s); 10 s still leaves a step's launch credential ample time on one machine
        self.cred_expire = 10
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def up(self) -> None:
        t0 = time.time()
        ensure_slurm_installed()
        self.install_s = time.time() - t0
        t0 = time.time()
        munge = self.root / "munge"
        munge.mkdir(exist_ok=True)
        shutil.chown(munge, "munge", "munge")
        self.root.chmod(0o755)
        sock = self.munge_socket = munge / "munge.socket"
        self.start_munge()
        host = socket.gethostname()
        ports = [free_port() for _ in range(3)]
        for d in ("state", "spool"):
            (self.root / d).mkdir(exist_ok=True)
        self.conf.write_text("\n".join([
            "ClusterName=hapo", f"SlurmctldHost={host}(127.0.0.1)", f"SlurmctldPort={ports[0]}",
            "AuthType=auth/munge", f"AuthInfo=socket={sock},cred_expire={self.cred_expire}",
            "SlurmUser=root",
            f"StateSaveLocation={self.root / 'state'}", f"SlurmdSpoolDir={self.root}/spool/%n",
            f"SlurmctldPidFile={self.root}/slurmctld.pid", f"SlurmdPidFile={self.root}/slurmd-%n.pid",
            f"SlurmctldLogFile={self.root}/slurmctld.log", f"SlurmdLogFile={self.root}/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none", "MpiDefault=none", "ReturnToService=2",
            "KillWait=30", "SchedulerParameters=sched_interval=1",
            f"NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port={ports[1]} "
            f"CPUs={self.cpus} State=UNKNOWN",
            f"NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port={ports[2]} "
            f"CPUs={self.cpus} State=UNKNOWN",
            "PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP", ""]))
        self.start(["slurmctld", "-D", "-i", "-f", str(self.conf)], "slurmctld.out", self.env)
        for node in ("n1", "n2"):
            self.start(["slurmd", "-D", "-N", node, "-f", str(self.conf)], f"slurmd-{node}.out",
                       self.env)
        wait_for("slurmctld and two idle slurmd (sinfo)", self._idle, 60,
                 self.root / "slurmctld.log")
        self.bringup_s = time.time() - t0

    def start_munge(self) -> None:
        """munged as the munge user, in the foreground, on this cluster's own socket."""
        munge = self.munge_socket.parent
        self.munged = self.start(
            ["runuser", "-u", "munge", "--", "munged", "-F", f"--socket={self.munge_socket}",
             f"--pid-file={munge / 'munged.pid'}", f"--log-file={munge / 'munged.log'}",
             f"--seed-file={munge / 'munged.seed'}"], "munged.out")
        wait_for("munged", self.munge_socket.exists, 20, munge / "munged.log")

    def stop_munge(self) -> None:
        """Stop munged (by pid): Slurm's clients then fail to sign requests ("munge down")."""
        stop_pids([self.munged.pid])
        self.procs.remove(self.munged)
        (self.root / "pids").write_text("".join(f"{p.pid}\n" for p in self.procs))

    def _idle(self) -> bool:
        res = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True,
                             env=self.env, timeout=30)
        states = dict(line.split() for line in res.stdout.splitlines() if line.strip())
        return res.returncode == 0 and states.get("n1") == "idle" and states.get("n2") == "idle"

    def down(self) -> None:
        if self.conf.exists():  # jobs first: their slurmstepd outlive the daemons otherwise
            subprocess.run(["scancel", "--user", "root", "--full"], env=self.env,
                           capture_output=True, timeout=30)
            end = time.time() + 40
            while time.time() < end and subprocess.run(
                    ["squeue", "-h"], env=self.env, capture_output=True, text=True,
                    timeout=30).stdout.strip():
                time.sleep(0.5)
        super().down()


class RayHead(_Owner):
    """`ray start --head --block` on loopback; `address` is its Jobs API (dashboard)."""

    def __init__(self, root: Path | None = None, num_cpus: int = 2,
                 worker_cpus: tuple[int, ...] = ()) -> None:
        super().__init__(root, "hapo-ray-")
        self.num_cpus = num_cpus
        self.worker_cpus = worker_cpus  # one more Ray node on this machine for each
        # loopback; stop_job's SIGTERM gets 60 s (not 3) to finish the step and checkpoint
        self.env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                    "RAY_JOB_STOP_WAIT_TIME_S": "60"}
        self.address = ""

    def up(self) -> None:
        t0 = time.time()
        ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
        if ray is None:
            raise RuntimeError("ray is not installed: pip install 'hapo[cluster]'")
        # Ray gives each node's raylet a fixed 30 s to register, else its `ray start` exits
        # ("The current node timed out during startup"): on a loaded machine, try again
        for _ in range(3):
            if self._try_up(ray):
                self.bringup_s = time.time() - t0
                return
            self.down()
            self.procs = []
        tail = (self.root / "ray.out").read_text(errors="replace").strip().splitlines()[-1:]
        raise RuntimeError("the Ray cluster did not come up in 3 tries (last log line: "
                           f"{tail[0] if tail else 'none'})")

    def _try_up(self, ray: str) -> bool:
        """Head, then the extra nodes; False when the head died starting (try again)."""
        port, dash = free_port(), free_port()
        self.address = f"http://127.0.0.1:{dash}"
        head = self.start([ray, "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                           "--port", str(port), "--dashboard-host", "127.0.0.1",
                           "--dashboard-port", str(dash), "--num-cpus", str(self.num_cpus),
                           "--num-gpus", "0", *self._node_ports(), "--temp-dir",
                           str(self.root / "r"), "--disable-usage-stats"], "ray.out",
                          self._head_env())
        wait_for(f"the Ray head's Jobs API ({self.address})",
                 lambda: head.poll() is not None or (self._answers() and self._alive_nodes() >= 1),
                 180, self.root / "ray.out")
        if head.poll() is not None:
            return False
        # more nodes on this machine: each its own raylet, object store and agent ports, all
        # under the head's temporary folder (one machine has one Ray session folder); one
        # whose `ray start` exits (missed the 30 s) is started again
        self.nodes: dict[int, subprocess.Popen] = {}
        for i, cpus in enumerate(self.worker_cpus):
            self._start_node(ray, port, i, cpus)
        end = time.time() + 300
        while self._alive_nodes() < 1 + len(self.worker_cpus):
            if head.poll() is not None:
                return False
            for i, cpus in enumerate(self.worker_cpus):
                if self.nodes[i].poll() is not None:
                    self.procs.remove(self.nodes[i])
                    self._start_node(ray, port, i, cpus)
            if time.time() > end:
                wait_for(f"{1 + len(self.worker_cpus)} alive Ray nodes", lambda: False, 0,
                         self.root / "ray-node1.out")
            time.sleep(0.5)
        return True

    def _start_node(self, ray: str, port: int, i: int, cpus: int) -> None:
        proc = self.start([ray, "start", "--block", "--address", f"127.0.0.1:{port}",
                           "--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus),
                           "--num-gpus", "0", *self._node_ports(), "--disable-usage-stats"],
                          f"ray-node{i + 1}.out",
                          # =0 (loopback head) also refuses to start a second node: 1 here
                          {**self.env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"})
        self.nodes[i] = proc

    def _head_env(self) -> dict:
        # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps every server on loopback but also refuses
        # a second node (`ray start --address` aborts; =1 there resolves 127.0.0.1 to the
        # machine's address, where a loopback head does not listen): with more nodes, the
        # head's GCS, raylet and object manager listen on all interfaces (its dashboard stays
        # on 127.0.0.1)
        return {**self.env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"} if self.worker_cpus \
            else self.env

    @staticmethod
    def _node_ports() -> list[str]:
        """Ports of one node's own servers, free ones (the defaults collide between nodes)."""
        out = []
        for opt in ("--node-manager-port", "--object-manager-port",
                    "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                    "--metrics-export-port", "--runtime-env-agent-port"):
            out += [opt, str(free_port())]
        return out

    def _alive_nodes(self) -> int:
        """Alive Ray nodes (0 while the dashboard does not answer)."""
        import json
        import urllib.request

        try:
            with urllib.request.urlopen(self.address + "/nodes?view=summary", timeout=5) as r:
                nodes = json.loads(r.read())["data"]["summary"]
        except (OSError, KeyError, ValueError):
            return 0
        return sum(n.get("raylet", {}).get("state") == "ALIVE" for n in nodes)

    def _answers(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(self.address + "/api/version", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def down(self) -> None:
        super().down()
        # Ray's workers and dashboard agents may leave the head's process group: stop each
        # process (by pid) whose command line names this head's own temporary folder
        try:
            import psutil
        except ImportError:
            return
        mine = str(self.root / "r")
        for p in psutil.process_iter(["pid", "cmdline"]):
            if any(mine in a for a in (p.info["cmdline"] or [])):
                try:
                    p.kill()
                except psutil.Error:
                    pass


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "stop":
        pids = Path(argv[1], "pids")
        stop_pids([int(x) for x in pids.read_text().split()] if pids.exists() else [])
        return 0
    owner = {"slurm": SlurmCluster, "ray": RayHead}.get(argv[0] if argv else "")
    if owner is None:
        print(__doc__)
        return 2
    with owner() as c:
        if isinstance(c, SlurmCluster):
            print(f"export SLURM_CONF={c.conf}   # up in {c.bringup_s:.1f} s")
        else:
            print(f"ray address: {c.address}   # up in {c.bringup_s:.1f} s")
        print(f"pids in {c.root}/pids; Ctrl-C stops it", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
