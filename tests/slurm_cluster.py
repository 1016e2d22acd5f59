"""A real, private SLURM cluster on this machine, for tests: munged + slurmctld + N slurmd ("nodes" n1..nN, all on
127.0.0.1), everything (key, sockets, state, logs, pid files) under one scratch directory, so the system's
/etc/munge, /etc/slurm and /run are never touched.

    with SlurmCluster(tmp_path, nodes=2) as cluster:
        job = cluster.sbatch("launch/slurm/multinode.sbatch", "cfg.yaml", env_extra={"X": "1"})
        assert cluster.wait(job, timeout=60) == "COMPLETED"

Skips the calling test (pytest.skip) when slurmctld/slurmd/munged are not installed (launch/install_slurm.sh).
docs/launching.md, "The test cluster's slurm.conf", says why each slurm.conf setting is there.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

# Terminal states as `scontrol show job` reports them. REQUEUED/PREEMPTED are transient (the job comes back PENDING).
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE"}
_BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo")
_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")


def _which(name: str) -> str | None:
    # /usr/sbin is often not on a non-login PATH, and the daemons live there.
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(_SBIN_DIRS))


def missing_binaries() -> list[str]:
    """Names of the SLURM/munge programs that are not installed (empty when the cluster can run)."""
    return [b for b in _BINARIES if _which(b) is None]


def _ports_free(ports: list[int]) -> bool:
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def pick_ports(count: int) -> list[int]:
    """`count` consecutive free TCP ports: SLURM's usual 6817.. if free, else a random block in 42000-48999 (away
    from torch's 29500 and from the 20000-39999 rendezvous ports that launch/slurm/ derives from job ids)."""
    bases = [6817] + random.sample(range(42000, 49000 - count), 50)
    for base in bases:
        ports = list(range(base, base + count))
        if _ports_free(ports):
            return ports
    raise RuntimeError(f"SlurmCluster: no block of {count} free TCP ports found")


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as dead (the daemons double-fork, so this is rare).
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def stop_pid(pid: int, grace: float = 10.0) -> None:
    """SIGTERM `pid`, SIGKILL it if still alive after `grace` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.1)


class SlurmCluster:
    """A private SLURM cluster: `nodes` slurmd daemons n1..nN on 127.0.0.1, one partition `debug` (the default).

    `env` is the client environment (os.environ + SLURM_CONF, minus any SLURM_* of an enclosing job). Use as a
    context manager; `start()`/`stop()` also work. Every daemon is stopped by the PID in its pid file.
    """

    def __init__(self, tmpdir: str | os.PathLike, nodes: int = 2, partition: str = "debug",
                 cred_expire: int = 10) -> None:
        missing = missing_binaries()
        if missing or os.geteuid() != 0:
            import pytest

            pytest.skip(f"SLURM not installed (missing {', '.join(missing)}; run launch/install_slurm.sh)" if missing
                        else "SlurmCluster needs root (SlurmUser=root; slurmd starts jobs as their user)")
        self.root = Path(tmpdir).resolve() / "slurm"
        self.nodes = [f"n{i + 1}" for i in range(nodes)]
        self.partition = partition
        self.cred_expire = cred_expire
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        # munge's unix socket path must fit in sun_path (108 bytes): pytest's tmp dirs can be deep.
        self.munge_dir = Path(tempfile.mkdtemp(prefix="munge-")) if len(str(self.root)) > 60 else self.root / "munge"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        self.env["SLURM_CONF"] = str(self.conf)
        self.env["PATH"] = os.pathsep.join([self.env.get("PATH", ""), *_SBIN_DIRS])
        self.first_job_id = random.randint(1000, 19000)
        self._started = False

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def __enter__(self) -> "SlurmCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 30.0) -> None:
        """Start munged, slurmctld and the slurmd daemons; return once `sinfo` shows every node idle."""
        for sub in ("state", "log", "run", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.munge_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.munge_dir, 0o700)
        self._started = True  # from here on stop() has something to clean up
        try:
            self._start_munge()
            self.ports = pick_ports(1 + len(self.nodes))
            self.conf.write_text(self._slurm_conf())
            self._daemon([_which("slurmctld"), "-f", str(self.conf)], self.root / "run" / "slurmctld.pid")
            for node in self.nodes:
                self._daemon([_which("slurmd"), "-f", str(self.conf), "-N", node],
                             self.root / "run" / f"slurmd.{node}.pid")
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise

    def _start_munge(self) -> None:
        key = self.munge_dir / "munge.key"
        if not key.exists():
            subprocess.run([_which("mungekey"), "-c", "-k", str(key)], check=True, capture_output=True)
        self.munge_socket = self.munge_dir / "munge.socket"
        self._daemon([_which("munged"), f"--socket={self.munge_socket}", f"--key-file={key}",
                      f"--log-file={self.munge_dir / 'munged.log'}", f"--pid-file={self.munge_dir / 'munged.pid'}",
                      f"--seed-file={self.munge_dir / 'munged.seed'}", "--force"],
                     self.munge_dir / "munged.pid")

    def _daemon(self, cmd: list[str], pid_file: Path, timeout: float = 15.0) -> int:
        # The daemons fork into the background and write their pid file; the foreground command exits at once.
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"SlurmCluster: {' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}\n"
                               f"{self.logs()}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid = _read_pid(pid_file)
            if pid and _alive(pid):
                return pid
            time.sleep(0.1)
        raise RuntimeError(f"SlurmCluster: {cmd[0]} wrote no live pid to {pid_file}\n{self.logs()}")

    def _slurm_conf(self) -> str:
        r, ctld_port, node_ports = self.root, self.ports[0], self.ports[1:]
        cpus = os.cpu_count() or 1
        return f"""# Written by tests/slurm_cluster.py: a private sandbox cluster, all nodes on loopback.
ClusterName=sandbox
# Random first job id: launch/slurm/ derives rendezvous ports from job ids, so runs of these tests do not all use one.
FirstJobId={self.first_job_id}
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Own munge socket; cred_expire=10: a requeued job may start again after 10 s instead of 120 s.
AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd.%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups in containers: track job processes through /proc.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
MinJobAge=600
KillWait=10
SlurmdTimeout=60
InactiveLimit=0
NodeName={self.nodes[0][:1]}[1-{len(self.nodes)}] NodeHostname={self.host} NodeAddr=127.0.0.1 \
Port={node_ports[0]}-{node_ports[-1]} CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        out = ""
        while time.monotonic() < deadline:
            proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True, text=True)
            out = proc.stdout
            states = dict(line.split() for line in out.splitlines() if line.strip())
            if all(states.get(n) == "idle" for n in self.nodes):
                return
            time.sleep(0.3)
        raise RuntimeError(f"SlurmCluster: nodes not idle after {timeout:.0f} s: {out!r}\n{self.logs()}")

    def stop(self) -> None:
        """Cancel every job, stop slurmd/slurmctld (TERM, then KILL after 10 s) and munged, each by its pid file."""
        if not self._started:
            return
        self._started = False
        if self.conf.exists():
            subprocess.run(["scancel", "--full", "--quiet", f"--partition={self.partition}"], env=self.env,
                           capture_output=True, timeout=30)
            deadline = time.monotonic() + 15  # let the job steps go down while slurmd is still there to end them
            while time.monotonic() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
                time.sleep(0.3)
        run = self.root / "run"
        pids = [_read_pid(run / f"slurmd.{n}.pid") for n in self.nodes] + [_read_pid(run / "slurmctld.pid")]
        for pid in pids:
            if pid:
                stop_pid(pid)
        # A job process that outlived its slurmstepd (none seen so far) would keep running: find it by the
        # SLURM_CONF that only this cluster's daemons and jobs carry.
        for pid in self._stray_pids():
            stop_pid(pid, grace=3)
        pid = _read_pid(self.munge_dir / "munged.pid")
        if pid:
            stop_pid(pid)
        if self.munge_dir != self.root / "munge":
            shutil.rmtree(self.munge_dir, ignore_errors=True)

    def _stray_pids(self) -> list[int]:
        marker = f"\0SLURM_CONF={self.conf}\0".encode()
        found = []
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                if marker in b"\0" + (proc / "environ").read_bytes() + b"\0" and int(proc.name) != os.getpid():
                    found.append(int(proc.name))
            except (OSError, ValueError):
                continue
        return found

    # ---- clients ---------------------------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True, env_extra: dict | None = None) -> subprocess.CompletedProcess:
        """Run a SLURM client command with this cluster's environment; raise with its stderr when it fails."""
        env = {**self.env, **(env_extra or {})}
        proc = subprocess.run(list(cmd), env=env, capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def sbatch(self, script: str | os.PathLike, *args: str, env_extra: dict | None = None,
               sbatch_args: tuple[str, ...] = (), chdir: str | os.PathLike | None = None) -> str:
        """Submit `script args...` (the submitting environment plus `env_extra` is exported); return the job id."""
        cmd = ["sbatch", "--parsable", f"--chdir={chdir or os.getcwd()}", *sbatch_args, str(script), *args]
        out = self.run(*cmd, env_extra=env_extra).stdout.strip()
        return out.split(";")[0]

    def job_info(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (the first record for an array job); empty once the job is forgotten."""
        proc = self.run("scontrol", "-o", "show", "job", str(job_id), check=False)
        if proc.returncode != 0 or not proc.stdout.strip():
            return {}
        line = proc.stdout.splitlines()[0]
        return dict(m.groups() for m in re.finditer(r"(\S+?)=(\S*)", line))

    def states(self, job_id: str) -> list[str]:
        """JobState of every record of `job_id` (one per array task)."""
        proc = self.run("scontrol", "-o", "show", "job", str(job_id), check=False)
        return re.findall(r"JobState=(\S+)", proc.stdout)

    def wait(self, job_id: str, timeout: float = 60.0, poll: float = 0.5) -> str:
        """Wait until the job (every task of an array) is in a final state; return it (the worst one for arrays)."""
        deadline = time.monotonic() + timeout
        states: list[str] = []
        while time.monotonic() < deadline:
            states = self.states(job_id)
            if states and all(s in FINAL_STATES for s in states):
                bad = [s for s in states if s != "COMPLETED"]
                return bad[0] if bad else "COMPLETED"
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} not finished after {timeout:.0f} s (states {states})\n"
                           f"{self.squeue()}\n{self.logs()}")

    def squeue(self) -> str:
        """`squeue` for this cluster (all jobs, all states)."""
        return self.run("squeue", "-a", "-o", "%.12i %.10T %.12r %.6D %R", check=False).stdout

    def scancel(self, job_id: str, *flags: str) -> None:
        """`scancel FLAGS JOB_ID`, e.g. scancel(job, "--signal=USR1", "--batch")."""
        self.run("scancel", *flags, str(job_id))

    def logs(self, tail: int = 30) -> str:
        """The last lines of every daemon log, for failure messages."""
        parts = []
        for path in sorted((self.root / "log").glob("*.log")) + [self.munge_dir / "munged.log"]:
            if path.exists():
                lines = path.read_text(errors="replace").splitlines()[-tail:]
                parts.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(parts)
