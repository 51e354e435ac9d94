"""Prompt-DAS training in one process: source training, the target oracle, and mean-teacher UDA / WDA.

:class:`PromptDASTrainer` holds the student, the optimizer and (for uda / wda) the EMA teacher; its
:meth:`~PromptDASTrainer.step` makes this step's batches, runs the student once over all of them,
steps the optimizer and updates the teacher. Per step::

    source crops ─ random prompt subsets (0 … all centres) ─ strong view ──────────────┐
    target crops ─ weak view ─ teacher ×2 ─ peaks → prompts; pseudo-labels, valid mask  │
                 └ strong view (same transform: labels, prompts, contrastive points) ──┤
                                                             student (one forward) ◀───┘
    L = L_seg + w_det·L_det  (source)  +  w_t·(L_seg(valid) + w_det·L_det + λ·L_pcl)  (target)
    AdamW step (poly LR)  →  teacher ← EMA(student)

Nothing is global: every crop of every step has its own random streams, keyed by (``settings.seed``,
domain, step, index in the global batch) (:mod:`volseg.training.replicas`).

:func:`train_promptdas` is the one training loop, in one process or data-parallel. What differs between
the two is passed in: a ``DistributedDataParallel`` student (``find_unused_parameters=True``: the
projector φ is idle in steps without prompts), the :class:`~volseg.training.replicas.Replica` (which crops
of each global batch this worker computes; the losses sum their statistics over replicas), an
``after_step`` hook (reporting, checkpoints) and a :class:`~volseg.training.resume.TrainerState` to resume
from. The teacher is built from the unwrapped student and updated from its weights after the
synchronised optimizer step, so it is identical on every replica. ``volseg/training/distributed.py`` runs this
loop under Ray Train.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from volseg.errors import ConfigError
from volseg.geometry import PointSet
from volseg.models import InputContract, ModelSpec, input_contract
from volseg.models.norms import calibrate_norms
from volseg.training.crops import CropSampler
from volseg.training.loop import StepCallback, TrainHistory, set_poly_lr
from volseg.training.losses import density_loss, segmentation_loss
from volseg.training.promptdas.batches import (
    PromptBatch,
    Slices,
    concat_batches,
    crop_slices,
    labelled_batch,
    paste_source_objects,
    pseudo_labelled_batch,
)
from volseg.training.promptdas.contrastive import prompt_contrastive_loss
from volseg.training.promptdas.guard import AdaptationGuard
from volseg.training.promptdas.settings import AdaptSettings
from volseg.training.promptdas.teacher import EMATeacher, unwrap
from volseg.training.replicas import (
    CALIBRATION_STREAM,
    GUARD_STREAM,
    ONE_PROCESS,
    SOURCE_STREAM,
    TARGET_STREAM,
    Replica,
    SampleRandom,
    crop_streams,
)
from volseg.training.resume import TrainerState

#: Prompt-DAS's input contract: grey input in [0, 1] (its encoder standardises internally).
PROMPTDAS_INPUT = input_contract(ModelSpec("promptdas"))


@dataclass(frozen=True)
class DomainData:
    """A domain's volumes: ``raw`` (an object with ``.shape`` and ``read(box)``, or a numpy array),
    ``labels`` of the same shape (instance ids or a mask; None when unlabelled) and ``points``, sparse
    centre annotations (WDA)."""

    raw: Any
    labels: Any | None = None
    points: PointSet | None = None


@dataclass(frozen=True)
class StepResult:
    """One optimizer step: the total ``loss`` and its named ``components`` (plus batch statistics)."""

    loss: float
    components: dict[str, float]


@dataclass(frozen=True)
class TrainingInputs:
    """What :func:`train_promptdas` trains: a ``model`` (not wrapped), the ``settings`` and the domains.
    Each data-parallel worker builds its own from the config (volumes are opened there, not shipped)."""

    model: nn.Module
    settings: AdaptSettings
    source: DomainData | None = None
    target: DomainData | None = None


@dataclass(frozen=True)
class AdaptResult:
    """The model to use for inference (eval mode) and the training history (with the guard's report,
    for uda / wda)."""

    model: nn.Module
    history: TrainHistory


class PromptDASTrainer:
    """Trains ``model`` (a Prompt-DAS, possibly DDP-wrapped) in place according to ``settings.mode``.

    ``source``/``target`` are the domains a mode uses: ``source`` needs labels (modes source, uda, wda;
    optional in uda / wda, which then train on the target alone); ``target`` needs labels in
    supervised-target, and points in wda. Crops, prompt subsets, contrastive points and augmentation
    draw from per-crop streams keyed by ``settings.seed`` and the step. ``replica`` says which crops of
    each step's global batch (``settings.batch_size`` per domain) this trainer computes.
    """

    def __init__(self, model: nn.Module, settings: AdaptSettings, source: DomainData | None = None,
                 target: DomainData | None = None, contract: InputContract = PROMPTDAS_INPUT,
                 replica: Replica = ONE_PROCESS) -> None:
        _check_domains(settings, source, target)
        self.model = model
        self.settings = settings
        self.contract = contract
        self.replica = replica
        self.shard = replica.shard(settings.batch_size)
        uses_source, uses_target = settings.mode != "supervised-target", settings.mode != "source"
        self.source = _sampler(source if uses_source else None, settings, True, contract)
        self.target = _sampler(target if uses_target else None, settings, settings.mode == "supervised-target",
                               contract)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate,
                                           weight_decay=settings.weight_decay)
        self.teacher = None
        self.calibration: torch.Tensor | None = None
        if settings.mode in ("uda", "wda"):
            calibrated = settings.calibrate_crops > 0 and self.target is not None
            self.teacher = EMATeacher(model, settings.ema_alpha, calibrated_norms=calibrated)
            if calibrated:
                self.calibration = self.target_images(CALIBRATION_STREAM, settings.calibrate_crops)
                self.calibrate_teacher()
        self.step_index = 0
        self.device = next(model.parameters()).device

    def target_images(self, stream: int, count: int) -> torch.Tensor:
        """The slices of ``count`` fixed target crops (``settings.crop``, placed anywhere) as model input,
        from ``stream`` (the same on every replica)."""
        s, sampler = self.settings, self.target
        assert sampler is not None
        crops = [sampler.crop_at(sampler.box(crop_streams(s.seed, stream, 0, i, 1)[0], anywhere=True))
                 for i in range(count)]
        return crop_slices(crops, self.contract, sampler.intensity).images

    def calibrate_teacher(self) -> None:
        """Re-estimate the teacher's BatchNorm statistics on the calibration crops (if it keeps its own)."""
        if self.teacher is not None and self.calibration is not None:
            calibrate_norms(self.teacher.model, self.calibration)

    @property
    def inference_model(self) -> nn.Module:
        """The EMA teacher for uda / wda (averaged weights, steadier than the last student), else the
        student itself."""
        return self.teacher.model if self.teacher is not None else unwrap(self.model)

    def crops(self, sampler: CropSampler, domain: int) -> tuple[Slices, list[SampleRandom]]:
        """This replica's crops of the step's global batch of ``domain``, cut into 2D samples, with one
        :class:`SampleRandom` per sample."""
        crops, randoms = [], []
        for index in self.shard:
            box, samples = crop_streams(self.settings.seed, domain, self.step_index, index, sampler.crop[0])
            crops.append(sampler.crop_at(sampler.box(box)))
            randoms += samples
        return crop_slices(crops, self.contract, sampler.intensity), randoms

    def make_batches(self) -> dict[str, PromptBatch]:
        """This step's batches: ``source`` (labelled source crops), ``target`` (labelled target crops, the
        oracle) and/or ``pseudo`` (pseudo-labelled target crops, from the current teacher; with
        ``source_paste``, the source crops' organelles pasted onto them)."""
        s = self.settings
        batches = {}
        if self.source is not None:
            slices, randoms = self.crops(self.source, SOURCE_STREAM)
            batches["source"] = labelled_batch(slices, s.sigma_source, randoms, s.labelled_augment, s.unprompted_share)
        if self.target is not None:
            slices, randoms = self.crops(self.target, TARGET_STREAM)
            if self.teacher is None:
                batches["target"] = labelled_batch(slices, s.density_sigma, randoms, s.labelled_augment,
                                                   s.unprompted_share)
            else:
                batches["pseudo"] = pseudo_labelled_batch(self.teacher.model, slices, s, randoms)
                if s.source_paste > 0:  # a source is given (_check_domains)
                    batches["pseudo"] = paste_source_objects(batches["pseudo"], batches["source"], s.source_paste,
                                                             randoms)
        return {name: batch.to(self.device) for name, batch in batches.items()}

    def losses(self, batches: dict[str, PromptBatch]) -> dict[str, torch.Tensor]:
        """One student forward pass over all batches (concatenated) → named, already weighted loss terms
        (their sum is the loss): ``{name}_seg``, ``{name}_det`` and, for batches with contrastive points,
        ``{name}_pcl``. Each is the loss of the global batch (statistics summed over replicas)."""
        s = self.settings
        total = self.replica.total
        joint = concat_batches(list(batches.values()))
        out = self.model(joint.image, joint.points, joint.point_mask, joint.contrastive_points)
        terms: dict[str, torch.Tensor] = {}
        start = 0
        for name, batch in batches.items():
            rows = slice(start, start + batch.image.shape[0])
            start = rows.stop
            weight = s.target_weight if name == "pseudo" else 1.0
            balanced = name == "pseudo" and s.balance_pseudo_labels
            terms[f"{name}_seg"] = weight * segmentation_loss(out.logits[rows, :1], batch.target, batch.valid,
                                                              balanced=balanced,
                                                              foreground_share=s.pseudo_foreground_share, total=total)
            terms[f"{name}_det"] = weight * s.density_weight * density_loss(out.density[rows], batch.density,
                                                                            total)
            if batch.contrastive_labels is not None and s.pcl_weight > 0:
                prompts = None if out.prompt_embeddings is None else out.prompt_embeddings[rows]
                contrastive = None if out.contrastive_embeddings is None else out.contrastive_embeddings[rows]
                pcl = prompt_contrastive_loss(prompts, joint.point_mask[rows], contrastive,
                                              joint.contrastive_labels[rows], s.pcl_temperature, total)
                terms[f"{name}_pcl"] = weight * s.pcl_weight * pcl
        return terms

    def step(self) -> StepResult:
        """One optimizer step (poly LR), then the teacher's EMA update. The loss and its components are
        those of the global batch; batch statistics (``…_prompts``, ``…_valid``) are this replica's."""
        s = self.settings
        set_poly_lr(self.optimizer, s.learning_rate, self.step_index, s.steps, s.poly_power)
        self.model.train()
        batches = self.make_batches()
        terms = self.losses(batches)
        loss = torch.stack(list(terms.values())).sum()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.teacher is not None:
            self.replica.share_buffers(unwrap(self.model))
            self.teacher.update(self.model)
        self.step_index += 1
        if self.step_index % s.calibrate_every == 0 or self.step_index == s.steps:
            self.calibrate_teacher()
        components = {name: float(t.detach()) for name, t in terms.items()}
        for name, batch in batches.items():
            components.update({f"{name}_{key}": value for key, value in batch.stats.items()})
        return StepResult(float(loss.detach()), components)

    def guard(self) -> AdaptationGuard | None:
        """The adaptation guard of uda / wda: probes are ``settings.guard.probes`` target crops from a stream
        of their own (the same on every replica)."""
        if self.teacher is None or self.target is None:
            return None
        s = self.settings
        probes = self.target_images(GUARD_STREAM, s.guard.probes)
        return AdaptationGuard(probes, s.guard, peak_threshold=s.peak_threshold, sigma_vx=s.density_sigma)

    def guarded_stop(self, guard: AdaptationGuard) -> bool:
        """Check the teacher now; True (teacher restored to its last healthy weights) when the run must stop."""
        assert self.teacher is not None
        return guard.update(self.step_index, self.teacher.model, unwrap(self.model))

    def state(self, history: TrainHistory) -> TrainerState:
        """The state to resume from after this step (live tensors: save it before the next step)."""
        teacher = self.teacher
        return TrainerState(self.step_index, unwrap(self.model).state_dict(), self.optimizer.state_dict(),
                            None if teacher is None else teacher.model.state_dict(),
                            0 if teacher is None else teacher.updates, history)

    def restore(self, state: TrainerState) -> None:
        """Continue from ``state`` (written by a trainer of the same model, settings and mode)."""
        if (state.teacher is None) != (self.teacher is None):
            raise ValueError(f"cannot resume {self.settings.mode!r} training from the state of a run "
                             f"{'without' if state.teacher is None else 'with'} a teacher")
        unwrap(self.model).load_state_dict(state.student)
        self.optimizer.load_state_dict(state.optimizer)
        if self.teacher is not None and state.teacher is not None:
            self.teacher.model.load_state_dict(state.teacher)
            self.teacher.updates = state.teacher_updates
        self.step_index = state.step


#: Called after each step (and its history record) with the trainer and the history so far.
StepHook = Callable[[PromptDASTrainer, TrainHistory], None]


def train_promptdas(model: nn.Module, settings: AdaptSettings, source: DomainData | None = None,
                    target: DomainData | None = None, on_step: StepCallback | None = None,
                    contract: InputContract = PROMPTDAS_INPUT, *, replica: Replica = ONE_PROCESS,
                    resume: TrainerState | None = None, after_step: StepHook | None = None) -> AdaptResult:
    """Train Prompt-DAS for ``settings.steps`` steps (see :class:`PromptDASTrainer`).

    ``model`` is trained in place (start uda / wda from a source-trained model); it may be a
    ``DistributedDataParallel`` module, one per ``replica``. ``resume``: go on from that state (its
    step count and history) instead of step 0. ``on_step`` gets progress, ``after_step`` the trainer
    after every step. Returns the model for inference, in eval mode: the EMA teacher for uda / wda,
    the trained model otherwise; its history covers every step, resumed ones included.
    """
    trainer = PromptDASTrainer(model, settings, source, target, contract, replica)
    history = TrainHistory()
    if resume is not None:
        trainer.restore(resume)
        history = resume.history
    guard = trainer.guard()
    first, earlier, begin = trainer.step_index, history.seconds, time.perf_counter()
    while trainer.step_index < settings.steps:
        if guard is not None and trainer.step_index % settings.guard.every == 0 and trainer.guarded_stop(guard):
            break
        result = trainer.step()
        history.record(result.loss, result.components)
        elapsed = time.perf_counter() - begin
        history.seconds = earlier + elapsed
        if on_step is not None:
            on_step(trainer.step_index, settings.steps, result.loss, (trainer.step_index - first) / elapsed)
        if after_step is not None:
            after_step(trainer, history)
    if guard is not None:
        if trainer.step_index == settings.steps:
            trainer.guarded_stop(guard)  # a last check: a run that collapsed late gives back its last healthy teacher
        history.guard = guard.report.to_json()
    model.eval()
    inference = trainer.inference_model
    inference.eval()
    return AdaptResult(inference, history)


def _check_domains(settings: AdaptSettings, source: DomainData | None, target: DomainData | None) -> None:
    mode = settings.mode
    needs = {
        "source": (source is not None and source.labels is not None, "source raw and labels"),
        "supervised-target": (target is not None and target.labels is not None, "target raw and labels"),
        "uda": (target is not None and (source is None or source.labels is not None),
                "a target raw volume (and, if a source is given, its labels)"),
        "wda": (target is not None and target.points is not None and (source is None or source.labels is not None),
                "a target raw volume with sparse points (and, if a source is given, its labels)"),
    }
    ok, what = needs[mode]
    if not ok:
        raise ConfigError(f"adapt mode {mode!r} needs {what}.", f"give {what}, or choose another mode.")
    if settings.source_paste > 0 and source is None:
        raise ConfigError(f"source_paste {settings.source_paste} pastes the source's labelled organelles, and "
                          "no source is given.", "give the source raw and labels, or set source_paste to 0.")


def _sampler(domain: DomainData | None, settings: AdaptSettings, labelled: bool, contract: InputContract
             ) -> CropSampler | None:
    if domain is None:
        return None
    labels = domain.labels if labelled else None
    wda_target = settings.mode == "wda" and not labelled
    share = settings.point_crop_share if wda_target else 0.0
    reach = settings.confirm_slices if wda_target else -1
    pseudo_labelled = settings.mode in ("uda", "wda") and not labelled
    neighbours = settings.persistence_slices if pseudo_labelled else 0
    return CropSampler(domain.raw, labels, settings.crop, settings.seed, domain.points, contract.percentiles, share,
                       reach, neighbours)
