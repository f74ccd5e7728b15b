"""SLURM through submitit: one task per GPU (or per CPU rank), the same training entry point as
`accelerate launch`, preemption-safe requeue.

How a preempted or timed-out job continues:
1. SLURM sends USR2 ``signal_delay_s`` before the end (``#SBATCH --signal=USR2@...``, set by submitit);
2. every rank's handler only sets a flag (:mod:`dist_vdr.run.preemption` replaces submitit's handler,
   which would checkpoint from rank 0's signal handler alone: impossible for collective saves);
3. at the next step boundary the ranks agree (all-reduce), save one complete checkpoint together,
   and leave the training loop;
4. global rank 0 requeues the job (``scontrol requeue``; the local executor reruns it), the others
   wait to be stopped; on restart rank 0 finds the newest complete checkpoint and broadcasts it.
A job that SLURM requeues by itself (node failure) resumes the same way.

submitit is imported only here, lazily: ``import dist_vdr`` does not need it.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from dist_vdr import log
from dist_vdr.run.folder import RunDir

logger = log.get(__name__)

@dataclass(kw_only=True)
class SlurmResources:
    """What to ask SLURM for. One task per GPU; CPU jobs (gpus_per_node=0) use tasks_per_node ranks per node."""

    nodes: int = 1
    """Nodes of the job."""
    gpus_per_node: int = 0
    """GPUs per node, one task (rank) each; 0 for CPU jobs."""
    tasks_per_node: int | None = None
    """Ranks per node (none: gpus_per_node, or 1 for CPU jobs)."""
    cpus_per_task: int | None = None
    """CPU cores per task (none: the cluster's default)."""
    mem_gb: float | None = None
    """Memory per node in GB (none: the cluster's default)."""
    time_min: int = 60
    """Time limit in minutes."""
    partition: str | None = None
    """SLURM partition (none: the cluster's default)."""
    account: str | None = None
    """SLURM account to charge."""
    qos: str | None = None
    """SLURM quality of service."""
    constraint: str | None = None
    """SLURM node feature constraint (e.g. a GPU type)."""
    signal_delay_s: int = 90
    """Seconds between the USR2 warning and the end: enough for one step plus a checkpoint."""
    job_name: str = "dist-vdr"
    """SLURM job name."""
    cluster: str = "slurm"
    """slurm, local (this machine, requeue emulated) or debug (in-process)."""
    extra: dict = field(default_factory=dict)
    """More sbatch options, KEY: VALUE (submitit's slurm_additional_parameters)."""

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ValueError(f"--nodes must be >= 1, got {self.nodes}")
        if self.gpus_per_node < 0:
            raise ValueError("--gpus-per-node must be >= 0")
        if self.tasks_per_node is None:
            self.tasks_per_node = self.gpus_per_node or 1
        if self.gpus_per_node and self.tasks_per_node != self.gpus_per_node:
            raise ValueError(f"one task per GPU: --tasks-per-node ({self.tasks_per_node}) must equal "
                             f"--gpus-per-node ({self.gpus_per_node})")
        if self.cluster not in ("slurm", "local", "debug"):
            raise ValueError(f"--cluster must be slurm, local or debug, got {self.cluster!r}")
        if self.time_min < 1:
            raise ValueError("--time must be >= 1 minute")

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node


def engine_env(launch_config: str | None) -> dict[str, str]:
    """Environment that `accelerate launch --config_file X` would give the workers for X's engine.

    DDP and CPU configs need none (the process group comes from the SLURM environment).
    DeepSpeed/FSDP configs are translated by accelerate's own launcher helpers.
    """
    if not launch_config:
        return {}
    import yaml

    spec = yaml.safe_load(Path(launch_config).read_text()) or {}
    kind = str(spec.get("distributed_type", "NO")).upper()
    if kind in ("NO", "MULTI_GPU", "MULTI_CPU"):
        return {}
    from dist_vdr import compat

    env = compat.launch_env(str(launch_config), deepspeed=kind == "DEEPSPEED")  # accelerate's own helpers
    keep = ("ACCELERATE_", "FSDP_", "DEEPSPEED_")
    return {k: str(v) for k, v in env.items() if k.startswith(keep)}


class TrainJob:
    """The submitit callable: runs `dist-vdr train` in every task (rank)."""

    def __init__(self, config_path: str, overrides: list[str], *, launch_config: str | None, workdir: str,
                 use_gpus: bool) -> None:
        self.config_path = str(Path(config_path).resolve())
        self.overrides = list(overrides)
        self.launch_config = str(Path(launch_config).resolve()) if launch_config else None
        self.workdir = str(workdir)
        self.use_gpus = use_gpus

    def __call__(self):
        from dist_vdr import compat
        from dist_vdr.run import preemption

        preemption.install()  # first: before gloo/torch threads exist (replaces submitit's USR2 handler)
        import submitit

        from dist_vdr.config import load_config
        from dist_vdr.run.training import run_training

        os.chdir(self.workdir)  # the recipe's relative paths mean what they meant at submission
        job_env = submitit.JobEnvironment()
        # overwrite: a MASTER_PORT inherited from the submitting shell must not win over the job's own
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=self.use_gpus, overwrite=True)
        os.environ.update(engine_env(self.launch_config))
        overrides = [*self.overrides, f"launch.expected_world_size={job_env.num_tasks}"]
        if not self.use_gpus:
            overrides.append("launch.device=cpu")
        logger.info(f"job {job_env.job_id} task {job_env.global_rank}/{job_env.num_tasks} on {job_env.hostname}, "
                    f"master {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}", extra=log.ALL_RANKS)
        result = run_training(load_config(self.config_path, overrides))
        if result.preempted and result.signal != "SIGUSR2":
            # scancel / SIGTERM: the step is saved; the user stopped the job, so no requeue.
            logger.info(f"job {job_env.job_id} stopped by {result.signal}: not requeued", extra=log.ALL_RANKS)
            return result if job_env.global_rank == 0 else None
        if result.preempted:
            if job_env.global_rank == 0:
                logger.info(f"requeueing job {job_env.job_id}")
                compat.requeue(job_env, countdown=1)  # slurm: scontrol requeue; local executor: exit code 144
                sys.exit(-1)
            time.sleep(120)  # the requeue stops this task; exiting first could fail the job instead
            sys.exit(-1)
        return result if job_env.global_rank == 0 else None

    def checkpoint(self, *args, **kwargs):
        """Only reached if USR2 arrives before training installed its own handler: rerun as is."""
        import submitit

        return submitit.helpers.DelayedSubmission(type(self)(self.config_path, self.overrides,
                                                             launch_config=self.launch_config, workdir=self.workdir,
                                                             use_gpus=self.use_gpus))


def submit(config_path: str, overrides: list[str], resources: SlurmResources, *, launch_config: str | None = None,
           log_dir: str | None = None):
    """Submit the training job; returns the submitit Job. Logs: <log_dir>/<job id>/<job id>_<rank>_log.{out,err}."""
    import submitit

    from dist_vdr.config import load_config

    cfg = load_config(config_path, overrides)  # refuse a bad recipe before anything reaches the queue
    from dist_vdr.run.training import run_output

    run_output(cfg).check()  # and an output_dir the run would refuse
    folder = Path(log_dir or RunDir(cfg.training.output_dir).slurm_logs) / "%j"
    executor = submitit.AutoExecutor(folder=str(folder), cluster=resources.cluster)
    params = dict(nodes=resources.nodes, tasks_per_node=resources.tasks_per_node, timeout_min=resources.time_min,
                  name=resources.job_name)
    if resources.cpus_per_task:
        params["cpus_per_task"] = resources.cpus_per_task
    if resources.gpus_per_node:
        params["gpus_per_node"] = resources.gpus_per_node
    if resources.mem_gb:
        params["mem_gb"] = resources.mem_gb
    # torchrun/accelerate give each worker OMP_NUM_THREADS=1; srun does not, and without it the
    # BLAS pools of every rank spin on all cores of the node (measured: 15x slower CPU steps).
    threads = resources.cpus_per_task or 1
    setup = [f"export {v}={threads}" for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")]
    if resources.cluster == "slurm":
        params.update(slurm_setup=setup, slurm_signal_delay_s=resources.signal_delay_s,
                      slurm_partition=resources.partition, slurm_account=resources.account,
                      slurm_qos=resources.qos, slurm_constraint=resources.constraint,
                      slurm_additional_parameters=dict(resources.extra))
        params = {k: v for k, v in params.items() if v is not None}
    elif resources.cluster == "local":
        params["local_setup"] = setup
    executor.update_parameters(**params)
    job = executor.submit(TrainJob(config_path, overrides, launch_config=launch_config, workdir=os.getcwd(),
                                   use_gpus=resources.gpus_per_node > 0))
    return job
