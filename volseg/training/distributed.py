"""Data-parallel training under Ray Train: the one training loop of :mod:`volseg.training`, on ``W`` workers.

::

    driver   train_distributed(job) ── TorchTrainer, W workers (one per GPU, NCCL; or CPU, gloo) ──┐
    worker r inputs = job.prepare()             the worker opens the volumes and builds the model
             student = DDP(model)               (specs and URLs cross the Ray boundary, never arrays)
             resume  = state of ray.train.get_checkpoint(), if Ray Train restarted the workers
             train_promptdas(student, …, replica=Replica(r, W), resume=resume, after_step=report)
    every checkpoint_every steps and after the last: the replicas check that they hold the same student
    and teacher; rank 0 writes a checkpoint directory, every rank calls ray.train.report (a barrier)

A checkpoint directory is a volseg checkpoint plus what resuming needs::

    model.safetensors, model.json     the inference model (the EMA teacher in uda / wda) and its card:
                                      `volseg run` reads it as it is
    trainer.safetensors, trainer.json student, optimizer, teacher, step and loss history (adapt/resume.py)

A worker that dies makes Ray Train restart all workers (``FailureConfig(max_failures)``); they resume from
the last reported checkpoint and, since every crop's random streams are keyed by step, train exactly as an
uninterrupted run would. Ray Train keeps its runs under ``cluster.storage`` (default: ``<stem>.ray/``
beside the output checkpoint), one run per configuration: running the same command again after the
driver died resumes that run.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray.train
import torch
from ray.train.torch import TorchTrainer, get_device, prepare_model
from torch import nn

from volseg.config import ClusterConfig
from volseg.engine.cluster import connected
from volseg.models import ModelSpec
from volseg.models.checkpoint import load_checkpoint, save_checkpoint
from volseg.training.loop import TrainHistory
from volseg.training.promptdas.teacher import unwrap
from volseg.training.promptdas.trainer import PromptDASTrainer, StepHook, TrainingInputs, train_promptdas
from volseg.training.replicas import Replica
from volseg.training.resume import load_state, read_history, save_state

#: The inference model's weights inside a checkpoint directory (its card is ``model.json``).
MODEL_FILE = "model.safetensors"


@dataclass(frozen=True)
class TrainingJob:
    """A data-parallel training run, as it crosses to the workers (picklable).

    ``prepare`` builds the :class:`TrainingInputs` in the process that calls it (e.g.
    ``functools.partial(adapt_inputs, config)``); ``settings.batch_size`` is the global batch, split
    evenly among the ``cluster.workers``. ``card``: what every checkpoint's card records (data, config);
    ``output``: the final checkpoint's path, which names the run. ``after_step`` runs in every worker
    after each step and its report (tests use it to kill a worker).
    """

    prepare: Callable[[], TrainingInputs]
    spec: ModelSpec
    card: dict[str, Any]
    output: str
    cluster: ClusterConfig
    after_step: StepHook | None = None

    @property
    def run_name(self) -> str:
        """``<output stem>-<hash of card, model and workers>``: a changed configuration is a new run."""
        signature = json.dumps({"card": self.card, "model": self.spec.to_json(), "workers": self.cluster.workers},
                               sort_keys=True, default=str)
        return f"{Path(self.output).stem}-{hashlib.sha256(signature.encode()).hexdigest()[:10]}"

    @property
    def storage(self) -> str:
        """Where Ray Train keeps the runs' checkpoints (``cluster.storage``, or beside ``output``)."""
        if self.cluster.storage is not None:
            return self.cluster.storage
        output = Path(self.output).resolve()
        return str(output.with_name(output.stem + ".ray"))


@dataclass(frozen=True)
class DistributedResult:
    """The trained ``model`` (for inference, eval mode) and ``history`` (every step, resumed ones too),
    read from the final ``checkpoint`` directory; ``resumed_from``: the step the last attempt started
    at (0 unless a worker died); ``backend``: ``nccl`` or ``gloo``."""

    model: nn.Module
    history: TrainHistory
    checkpoint: str
    workers: int
    resumed_from: int
    backend: str
    metrics: dict[str, Any] = field(default_factory=dict)


def train_distributed(job: TrainingJob) -> DistributedResult:
    """Run ``job`` on ``job.cluster.workers`` Ray Train workers (the connected cluster, ``cluster.address``,
    or a local Ray instance); returns the final checkpoint's model and history."""
    cluster = job.cluster
    with connected(cluster.address) as resources:
        use_gpu = cluster.use_gpu if cluster.use_gpu is not None else resources.gpus >= 1
        per_worker = {"CPU": cluster.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
        trainer = TorchTrainer(
            _train_worker, train_loop_config={"job": job},
            scaling_config=ray.train.ScalingConfig(num_workers=cluster.workers, use_gpu=use_gpu,
                                                   resources_per_worker=per_worker),
            run_config=ray.train.RunConfig(
                name=job.run_name, storage_path=job.storage,
                failure_config=ray.train.FailureConfig(max_failures=cluster.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
        )
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run {job.run_name} under {job.storage} ended without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        model = load_checkpoint(Path(directory) / MODEL_FILE, job.spec).eval()
        history = read_history(directory)
    metrics = dict(result.metrics or {})
    return DistributedResult(model, history, result.checkpoint.path, cluster.workers,
                             int(metrics.get("resumed_from", 0)), "nccl" if use_gpu else "gloo", metrics)


def _train_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: build the inputs, wrap the student in DDP, resume if there is a checkpoint,
    run the training loop with the reporting hook."""
    job: TrainingJob = config["job"]
    context = ray.train.get_context()
    replica = Replica(context.get_world_rank(), context.get_world_size())
    inputs = job.prepare()
    model = inputs.model
    if get_device().type == "cuda":  # one BatchNorm over the global batch, as in one process (GPU only)
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            resume = load_state(directory)
    start = 0 if resume is None else resume.step
    reporter = _Reporter(job, replica, start)
    train_promptdas(model, inputs.settings, inputs.source, inputs.target, replica=replica, resume=resume,
                    after_step=reporter)


class _Reporter:
    """The ``after_step`` hook of a worker: checkpoint and report every ``checkpoint_every`` steps and
    after the last, then the job's own hook."""

    def __init__(self, job: TrainingJob, replica: Replica, start: int) -> None:
        self.job, self.replica, self.start = job, replica, start
        self.window = (start, time.perf_counter())

    def __call__(self, trainer: PromptDASTrainer, history: TrainHistory) -> None:
        step, total = trainer.step_index, trainer.settings.steps
        if step % self.job.cluster.checkpoint_every == 0 or step == total:
            self.report(trainer, history)
        if self.job.after_step is not None:
            self.job.after_step(trainer, history)

    def report(self, trainer: PromptDASTrainer, history: TrainHistory) -> None:
        _check_replicas_agree(trainer, self.replica)
        step = trainer.step_index
        first, since = self.window
        metrics = {"step": step, "loss": history.losses[-1], "resumed_from": self.start,
                   "samples_per_second": samples_per_step(trainer) * (step - first) / (time.perf_counter() - since)}
        with tempfile.TemporaryDirectory() as directory:
            checkpoint = None
            if self.replica.rank == 0:
                card = {**self.job.card, **history.card(), "workers": self.replica.world_size}
                save_checkpoint(Path(directory) / MODEL_FILE, trainer.inference_model, self.job.spec, card)
                save_state(trainer.state(history), directory)
                checkpoint = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_{step:08d}")
        self.window = (step, time.perf_counter())


def samples_per_step(trainer: PromptDASTrainer) -> int:
    """2D samples the student sees per step, over all replicas: crops per domain × domains × crop depth."""
    s = trainer.settings
    domains = (trainer.source is not None) + (trainer.target is not None)
    return s.batch_size * domains * s.crop[0]


def _check_replicas_agree(trainer: PromptDASTrainer, replica: Replica) -> None:
    """Every replica must hold the same student and EMA teacher (DDP averages the gradients, so the
    optimizer steps agree, and the teacher follows the student); raise if they drifted apart."""
    models = [unwrap(trainer.model)] + ([] if trainer.teacher is None else [trainer.teacher.model])
    sums = torch.stack([p.detach().double().sum() for m in models for p in m.state_dict().values()
                        if p.is_floating_point()])
    if not replica.same_everywhere(sums):
        raise RuntimeError(f"step {trainer.step_index}: the data-parallel replicas hold different student or "
                           "teacher weights; they must stay identical (this is a bug in volseg)")
