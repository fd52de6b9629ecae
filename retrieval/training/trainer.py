"""`tune`: train or fine-tune an open_clip model on image-caption pairs.

The loss is open_clip's own: ClipLoss (InfoNCE over the batch, both ways, with the learnable
temperature exp(logit_scale)) or SigLipLoss (a sigmoid per pair with a learnable bias). AdamW
with linear warm-up then cosine decay, per step. A held-out split of the pairs (by image) is
evaluated before training and after every epoch with `clipdex eval`'s figures. The run can be
killed at any time: the resume file written every `checkpoint_every` steps holds all of its
state, and a run resumed from it sees the same batches as one that was never stopped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrieval.core.errors import ClipdexError
from retrieval.embedding.clip_model import ClipModel
from retrieval.embedding.spec import RANDOM, ModelSpec
from retrieval.evaluation.datasets import CaptionSet, load_dataset
from retrieval.evaluation.evaluate import caption_figures
from retrieval.evaluation.metrics import RankFigures

from .checkpoint import atomic_save, load_resume, random_states, resume_path, save_weights, set_random_states
from .data import EvalImages, PairDataset, collate_indexed, epoch_loader

LOSSES = ("clip", "siglip")
FIT_AFTER_STEPS = 20  # steps timed before the schedule is fitted to a time budget
# The state a resumed run must share with the run that wrote the resume file.
_SAME_RUN_FIELDS = ("arch", "pretrained", "loss", "batch_size", "epochs", "seed", "holdout", "lock_image")
_SAME_RUN_FIELDS += ("freeze_layers", "lr", "weight_decay", "warmup")


@dataclass(frozen=True)
class TuneOptions:
    arch: str
    out: Path
    pretrained: str = RANDOM  # 'random' (seeded), a pretrained tag, or a checkpoint file
    loss: str = "clip"
    epochs: int = 10
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.1
    warmup: int = 100  # steps of linear warm-up before the cosine decay
    lock_image: bool = False  # LiT: the image tower stays as loaded, only the text side learns
    freeze_layers: int = 0  # the embeddings and this many lowest blocks of each tower stay fixed
    holdout: float = 0.1  # share of the images (with their captions) kept out for evaluation
    time_budget: float | None = None  # minutes; the run stops after the step that passes it
    max_steps: int | None = None  # stop after this many steps in all (the schedule still spans the epochs)
    checkpoint_every: int = 100  # steps between resume files
    workers: int = 2  # DataLoader processes decoding and augmenting
    seed: int = 0
    resume: bool | None = None  # None: resume when the resume file exists
    threads: int = 0  # torch threads (0: torch's choice)
    device: str = "cpu"
    kind: str = "captions"


@dataclass
class EpochReport:
    epoch: int
    step: int
    loss: float  # mean training loss over the epoch's steps run in this process
    heldout: RankFigures | None  # text-to-image on the held-out split
    seconds: float

    def to_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "loss": self.loss,
            "heldout_text_to_image": None if self.heldout is None else self.heldout.to_dict(),
            "seconds": round(self.seconds, 1),
        }


@dataclass
class TuneSummary:
    out: Path
    step: int
    total_steps: int
    finished: bool
    stopped_by: str | None = None  # 'time budget' or 'max steps'
    resumed_from: int | None = None
    before: RankFigures | None = None  # held-out text-to-image before any training
    history: list[EpochReport] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # per step, this process
    images_per_second: float = 0.0
    train_images: int = 0
    heldout_images: int = 0
    arch: str = ""

    def to_dict(self) -> dict:
        return {
            "out": str(self.out),
            "arch": self.arch,
            "step": self.step,
            "total_steps": self.total_steps,
            "finished": self.finished,
            "stopped_by": self.stopped_by,
            "resumed_from": self.resumed_from,
            "train_images": self.train_images,
            "heldout_images": self.heldout_images,
            "images_per_second": round(self.images_per_second, 2),
            "heldout_before": None if self.before is None else self.before.to_dict(),
            "epochs": [e.to_dict() for e in self.history],
        }


Notify = Callable[[str], None]  # one line of news: resumed, checkpoint written, an epoch's figures


class WarmupCosine:
    """Learning-rate factor: linear warm-up over `warmup` steps, then cosine down to 0 at `total`.
    A class, not a lambda: LambdaLR keeps its fields in the scheduler's state_dict."""

    def __init__(self, warmup: int, total: int):
        self.warmup = warmup
        self.total = total

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        span = max(1, self.total - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - self.warmup) / span)))


def fit_total_steps(
    step: int, total: int, seconds_left: float, seconds_per_step: float, eval_seconds_per_step: float
) -> int:
    """The schedule's length that ends within the time left: steps at the measured speed, plus
    the held-out evaluation every epoch spread over its steps, with 2% to spare. Never longer than
    `total` (the epochs asked for), never before the step already reached."""
    per_step = max(seconds_per_step + eval_seconds_per_step, 1e-9)
    return max(step + 1, min(total, step + int(0.98 * max(seconds_left, 0.0) / per_step)))


def tune(
    pairs_path: str | Path, options: TuneOptions, notify: Notify | None = None, progress: bool = False
) -> TuneSummary:
    """Train per `options` on the pairs at `pairs_path` (TSV or COCO JSON); write `options.out`."""
    say = notify or (lambda _line: None)
    opts = _checked(options)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    data = load_dataset(pairs_path, kind=opts.kind)
    if not isinstance(data, CaptionSet):
        raise ClipdexError(f"{pairs_path}: tune needs image-caption pairs, not a labelled set")
    train_set, held = data.split(opts.holdout, opts.seed) if opts.holdout > 0 else (data, None)
    steps_per_epoch = len(train_set.images) // opts.batch_size
    if steps_per_epoch == 0:
        raise ClipdexError(
            f"--batch-size {opts.batch_size} is larger than the {len(train_set.images)} training images"
        )
    run = _Run(opts, train_set, held, steps_per_epoch, say)
    return run.train(progress)


def _checked(opts: TuneOptions) -> TuneOptions:
    if opts.loss not in LOSSES:
        raise ClipdexError(f"unknown loss '{opts.loss}': use clip or siglip")
    for name in ("epochs", "batch_size", "checkpoint_every"):
        if getattr(opts, name) < 1:
            raise ClipdexError(f"{name.replace('_', '-')} must be at least 1")
    if opts.batch_size < 2:
        raise ClipdexError("--batch-size must be at least 2: the loss contrasts pairs within a batch")
    if Path(opts.out).is_dir() or not Path(opts.out).parent.is_dir():
        # Checked before training: otherwise the first save, minutes in, would fail.
        raise ClipdexError(f"--out {opts.out}: give a checkpoint file in an existing folder")
    if opts.lock_image and opts.pretrained == RANDOM:
        raise ClipdexError(
            "--lock-image keeps the image tower as loaded: give trained weights with --pretrained"
        )
    return opts


class _Run:
    def __init__(
        self,
        opts: TuneOptions,
        train_set: CaptionSet,
        held: CaptionSet | None,
        steps_per_epoch: int,
        say: Notify,
    ):
        self.opts = opts
        self.say = say
        self.train_set = train_set
        self.held = held
        self.steps_per_epoch = steps_per_epoch
        self.total = opts.epochs * steps_per_epoch
        self.clip = ClipModel(ModelSpec(opts.arch, opts.pretrained, opts.device, "fp32", opts.seed, "torch"))
        self.model = self.clip.model
        _check_loss_fits(self.model, opts)
        _freeze(self.model, opts)
        self.model.train()
        self.optimizer = torch.optim.AdamW(
            _param_groups(self.model, opts.weight_decay), lr=opts.lr, betas=(0.9, 0.98), eps=1e-6
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, WarmupCosine(opts.warmup, self.total)
        )
        self.loss_fn = _loss(opts.loss)
        from open_clip.transform import PreprocessCfg, image_transform_v2

        cfg = PreprocessCfg(**self.model.visual.preprocess_cfg)
        self.draft = _draft_size(cfg.size)
        self.pairs = PairDataset(
            train_set, image_transform_v2(cfg, is_train=True), self.clip.tokenizer, opts.seed, self.draft
        )
        self.eval_transform = image_transform_v2(cfg, is_train=False)
        self.step = 0
        self.fitted = opts.time_budget is None  # the schedule's length is final
        self.eval_seconds = 0.0  # one held-out evaluation
        self.evals_seconds = 0.0  # all of this process's epoch-end evaluations
        self.summary = TuneSummary(
            opts.out,
            0,
            self.total,
            False,
            train_images=len(train_set.images),
            heldout_images=0 if held is None else len(held.images),
            arch=self.clip.arch,
        )

    # -- the loop -------------------------------------------------------------------------
    def train(self, progress: bool) -> TuneSummary:
        self._maybe_resume()
        if self.step == 0 and self.held is not None:
            t0 = time.monotonic()
            self.summary.before = self.evaluate_heldout()
            self.eval_seconds = time.monotonic() - t0
            self.say(f"held-out before training: {_figures_line(self.summary.before)}")
        started = time.monotonic()
        seen, first_step = 0, self.step
        bar = _bar(progress, self.total, self.step)
        try:
            while self.step < self.total:
                epoch, skip = divmod(self.step, self.steps_per_epoch)
                epoch_started, losses = time.monotonic(), []
                loader = epoch_loader(self.pairs, epoch, self.opts.batch_size, skip, self.opts.workers)
                for batch in loader:
                    loss = self._step(batch)
                    if loss is not None:
                        losses.append(loss)
                        seen += self.opts.batch_size
                    elapsed = time.monotonic() - started
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(
                            loss=f"{loss if loss is not None else float('nan'):.4f}",
                            img_s=f"{seen / max(elapsed, 1e-9):.1f}",
                        )
                    self.summary.images_per_second = seen / max(elapsed, 1e-9)
                    if not self.fitted and self.step - first_step >= FIT_AFTER_STEPS:
                        self._fit_to_budget(
                            elapsed, (elapsed - self.evals_seconds) / (self.step - first_step)
                        )
                        if bar is not None:
                            bar.total = self.total
                    stop = self._stop_reason(elapsed)
                    if stop is not None:
                        self._save_all()
                        self.summary.stopped_by = stop
                        self.say(f"stopped by the {stop} at step {self.step}; run again to continue")
                        return self._done()
                    if self.step % self.opts.checkpoint_every == 0:
                        self._save_resume()
                        self.say(f"checkpoint: step {self.step}")
                    if self.step >= self.total:
                        break  # the schedule was fitted to the time budget: it may end inside an epoch
                t0 = time.monotonic()
                self._end_epoch(epoch, losses, t0 - epoch_started)
                self.evals_seconds += time.monotonic() - t0
        finally:
            if bar is not None:
                bar.close()
        save_weights(self.model, self.opts.out)
        # Finished: a new run with this --out starts afresh.
        resume_path(self.opts.out).unlink(missing_ok=True)
        self.summary.finished = True
        return self._done()

    def _fit_to_budget(self, elapsed: float, seconds_per_step: float) -> None:
        """Shorten the schedule to the steps the time budget allows, measured on the first steps of
        this run, so that the learning rate has decayed when time is up (a cosine cut off halfway
        leaves the weights noisy). Fixed once, and kept in the resume file: a resumed run follows
        the same schedule."""
        self.fitted = True
        if self.opts.time_budget is None:
            return
        fitted = fit_total_steps(
            self.step,
            self.total,
            self.opts.time_budget * 60 - elapsed,
            seconds_per_step,
            self.eval_seconds / self.steps_per_epoch if self.held is not None else 0.0,
        )
        if fitted < self.total:
            self.total = fitted
            self.summary.total_steps = fitted
            self.scheduler.lr_lambdas[0].total = fitted  # type: ignore[attr-defined]
            epochs = fitted / self.steps_per_epoch
            self.say(f"schedule fitted to the time budget: {fitted} steps ({epochs:.1f} epochs)")

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor] | None) -> float | None:
        self.step += 1
        if batch is None or len(batch[0]) < 2:  # every image of the batch unreadable: nothing to learn
            self.scheduler.step()
            return None
        images, tokens = batch
        out = self.model(images.to(self.opts.device), tokens.to(self.opts.device))
        image_features, text_features, logit_scale = out[0], out[1], out[2]
        if self.opts.loss == "siglip":
            loss = self.loss_fn(image_features, text_features, logit_scale, out[3])
        else:
            loss = self.loss_fn(image_features, text_features, logit_scale)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        with torch.no_grad():  # as open_clip's trainer: a temperature above 100 only destabilises
            self.model.logit_scale.clamp_(0, math.log(100))
        value = float(loss.detach())
        self.summary.losses.append(value)
        return value

    def _stop_reason(self, elapsed: float) -> str | None:
        if self.opts.max_steps is not None and self.step >= self.opts.max_steps and self.step < self.total:
            return "max steps"
        if (
            self.opts.time_budget is not None
            and elapsed >= self.opts.time_budget * 60
            and self.step < self.total
        ):
            return "time budget"
        return None

    def _end_epoch(self, epoch: int, losses: list[float], seconds: float) -> None:
        t0 = time.monotonic()
        heldout = self.evaluate_heldout() if self.held is not None else None
        self.eval_seconds = time.monotonic() - t0 if heldout is not None else self.eval_seconds
        report = EpochReport(
            epoch + 1, self.step, float(np.mean(losses)) if losses else float("nan"), heldout, seconds
        )
        self.summary.history.append(report)
        line = f"epoch {epoch + 1}/{self.opts.epochs}: loss {report.loss:.4f}"
        self.say(line + (f", held-out {_figures_line(heldout)}" if heldout is not None else ""))
        self._save_all()

    def _done(self) -> TuneSummary:
        self.summary.step = self.step
        return self.summary

    # -- held-out figures ---------------------------------------------------------------------
    @torch.no_grad()
    def evaluate_heldout(self) -> RankFigures:
        assert self.held is not None
        from torch.utils.data import DataLoader

        self.model.eval()
        try:
            images = EvalImages(self.held.images, self.eval_transform, self.draft)
            loader = DataLoader(
                images, batch_size=128, num_workers=self.opts.workers, collate_fn=collate_indexed
            )
            kept: list[int] = []
            parts = []
            for positions, pixels in loader:
                if pixels is not None:
                    kept += positions
                    parts.append(
                        self.model.encode_image(pixels.to(self.opts.device), normalize=True).float().cpu()
                    )
            failed = set(range(len(self.held.images))) - set(kept)
            held = self.held.without_images(failed)
            if not held.images:
                raise ClipdexError("none of the held-out images could be read")
            texts = []
            for i in range(0, len(held.captions), 256):
                tokens = self.clip.tokenizer(list(held.captions[i : i + 256])).to(self.opts.device)
                texts.append(self.model.encode_text(tokens, normalize=True).float().cpu())
            image_vectors = torch.cat(parts).numpy()
            text_vectors = torch.cat(texts).numpy()
        finally:
            self.model.train()
        return caption_figures(image_vectors, text_vectors, held).text_to_image

    # -- files --------------------------------------------------------------------------------
    def _save_resume(self) -> None:
        atomic_save(
            {
                "step": self.step,
                "total": self.total,
                "fitted": self.fitted,
                "options": {k: getattr(self.opts, k) for k in _SAME_RUN_FIELDS},
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "random": random_states(),
                "history": [e.to_dict() for e in self.summary.history],
                "before": None if self.summary.before is None else self.summary.before.to_dict(),
            },
            resume_path(self.opts.out),
        )

    def _save_all(self) -> None:
        self._save_resume()
        save_weights(self.model, self.opts.out)

    def _maybe_resume(self) -> None:
        path = resume_path(self.opts.out)
        if not path.is_file():
            if self.opts.resume:
                raise ClipdexError(f"nothing to resume: no {path}")
            return
        if self.opts.resume is False:
            raise ClipdexError(
                f"{path} exists from an unfinished run: pass --resume, or delete it to start over"
            )
        state = load_resume(path)
        recorded = state.get("options", {})
        changed = [k for k in _SAME_RUN_FIELDS if recorded.get(k) != getattr(self.opts, k)]
        if changed:
            raise ClipdexError(
                f"{path} is from a run with other settings ({', '.join(changed)}): use the same ones, "
                "or delete it to start over"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_random_states(state["random"])
        self.step = int(state["step"])
        self.total = int(state.get("total", self.total))
        self.fitted = bool(state.get("fitted", self.fitted))
        self.summary.total_steps = self.total
        self.summary.resumed_from = self.step
        self.say(f"resumed from step {self.step} ({path})")


# -- model set-up -------------------------------------------------------------------------------
def _loss(name: str) -> Any:
    from open_clip.loss import ClipLoss, SigLipLoss

    return SigLipLoss() if name == "siglip" else ClipLoss()


def _check_loss_fits(model: torch.nn.Module, opts: TuneOptions) -> None:
    """SigLIP learns a bias that the checkpoint must be able to load back: only an architecture
    whose config has it (init_logit_bias) does, as open_clip's SigLIP configs."""
    has_bias = getattr(model, "logit_bias", None) is not None
    if opts.loss == "siglip" and not has_bias:
        raise ClipdexError(
            f"--loss siglip needs an architecture with a logit bias (init_logit_bias in its config), "
            f"which {opts.arch} lacks: use a SigLIP architecture, e.g. clipdex-small-sigmoid"
        )


def _freeze(model: torch.nn.Module, opts: TuneOptions) -> None:
    if opts.lock_image:
        model.lock_image_tower(unlocked_groups=0, freeze_bn_stats=True)
    if opts.freeze_layers <= 0:
        return
    visual, n = model.visual, opts.freeze_layers
    towers = [getattr(visual, "transformer", None), getattr(model, "transformer", None)]
    if any(t is None or not hasattr(t, "resblocks") for t in towers):
        raise ClipdexError(f"--freeze-layers needs transformer towers; {opts.arch} has another kind")
    depth = min(len(t.resblocks) for t in towers)  # type: ignore[union-attr]
    if n > depth:
        raise ClipdexError(f"--freeze-layers {n}: the towers of {opts.arch} have {depth} layers")
    frozen: list[Any] = [
        getattr(visual, name, None) for name in ("conv1", "class_embedding", "positional_embedding", "ln_pre")
    ]
    frozen += [getattr(model, name, None) for name in ("token_embedding", "positional_embedding")]
    frozen += [block for t in towers for block in t.resblocks[:n]]  # type: ignore[union-attr]
    for part in frozen:
        if isinstance(part, (torch.nn.Parameter, torch.nn.Module)):
            part.requires_grad_(False)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only, as open_clip's trainer: not on gains, biases, embeddings of
    one dimension, nor the temperature and bias of the loss."""
    decay, plain = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (plain if no_decay else decay).append(p)
    return [{"params": plain, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def _draft_size(size: int | tuple[int, int]) -> int:
    """JPEGs decoded at a reduced scale still at least twice the model's input (as an index run)."""
    return 2 * (max(size) if isinstance(size, (tuple, list)) else int(size))


def _bar(progress: bool, total: int, done: int):  # type: ignore[no-untyped-def]
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=done, unit="step", dynamic_ncols=True)


def _figures_line(fig: RankFigures) -> str:
    recalls = " ".join(f"R@{k} {100 * v:.1f}%" for k, v in fig.recall.items())
    chance = 100 * fig.chance_recall[max(fig.chance_recall)]
    top = max(fig.recall)
    return f"{recalls}, median rank {fig.median_rank:g} of {fig.candidates} (chance R@{top} {chance:.1f}%)"
