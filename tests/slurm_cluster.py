"""A real two-node SLURM cluster on this host, for integration tests (Debian's slurmctld + 2 slurmd).

Both "nodes" (n1, n2) are slurmd daemons on this machine with their own ports, spool and pid files;
no munge (auth/none + cred/none), no accounting (sacct is unavailable: job state comes from
scontrol and from files the job writes). Needs root and the slurmctld/slurmd/slurm-client packages
(.ci/run installs them).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

CONF = """\
ClusterName=distvdr
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
AuthType=auth/none
CredType=cred/none
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
SlurmUser=root
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=600
InactiveLimit=0
SlurmdTimeout=30
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldPidFile={root}/slurmctld.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
NodeName=n[1-2] NodeHostname={host} NodeAddr=127.0.0.1 Port={node_ports} CPUs=2 RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


def available() -> str | None:
    """None when a local cluster can be started here, else why not."""
    missing = [b for b in ("slurmctld", "slurmd", "sbatch", "scontrol") if shutil.which(b) is None]
    if missing:
        return f"slurm binaries missing: {missing} (apt-get install slurmctld slurmd slurm-client)"
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root"
    return None


class LocalSlurm:
    def __init__(self, root: Path, ctld_port: int = 16817, node_port: int = 17001) -> None:
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.ctld_port, self.node_port = ctld_port, node_port
        self.procs: list[subprocess.Popen] = []

    def start(self, timeout: float = 60) -> LocalSlurm:
        host = socket.gethostname().split(".")[0]
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(CONF.format(host=host, root=self.root, ctld_port=self.ctld_port,
                                         node_ports=f"{self.node_port}-{self.node_port + 1}"))
        _ensure_hosts(["n1", "n2"])
        self.procs.append(subprocess.Popen(["slurmctld", "-D", "-i", "-f", str(self.conf)], env=self.env,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for node in ("n1", "n2"):
            self.procs.append(subprocess.Popen(["slurmd", "-D", "-N", node, "-f", str(self.conf)], env=self.env,
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = self.run(["sinfo", "-h", "-o", "%T %D"], check=False).stdout
            if "idle 2" in out or out.split().count("idle") == 2:
                return self
            time.sleep(0.5)
        raise RuntimeError(f"local SLURM did not come up: sinfo says {out!r}; logs in {self.root}")

    def run(self, cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check, timeout=60)

    def job_field(self, job_id: str, field: str) -> str | None:
        out = self.run(["scontrol", "show", "job", job_id, "-o"], check=False).stdout
        for item in out.split():
            if item.startswith(field + "="):
                return item.split("=", 1)[1]
        return None

    def release(self, job_id: str, timeout: float = 60) -> None:
        """Start a requeued job now instead of after Slurm's requeue delay (BeginTime ~ +2 min).

        The update only holds once the job is back to PENDING, so repeat it until the job left PENDING.
        """
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.job_field(job_id, "JobState")
            if state == "PENDING":
                self.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=False)
            elif state not in ("COMPLETING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", None) and \
                    self.job_field(job_id, "Restarts") not in (None, "0"):
                return
            time.sleep(2)

    def stop(self) -> None:
        self.run(["scancel", "--full", "-u", "root"], check=False)
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        self.procs.clear()


def _ensure_hosts(names: list[str]) -> None:
    hosts = Path("/etc/hosts")
    text = hosts.read_text()
    missing = [n for n in names if not any(n in line.split()[1:] for line in text.splitlines() if line.strip())]
    if missing:
        with hosts.open("a") as f:
            f.write(f"127.0.0.1 {' '.join(missing)}\n")
