"""`clipdex eval` and `clipdex tune`: measure a model's retrieval quality on a captioned or
labelled set, and train or fine-tune one on image-caption pairs. Parse, call the library, print;
the library is imported inside each command so that `clipdex --help` stays fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from retrieval.evaluation.evaluate import Report
    from retrieval.evaluation.metrics import RankFigures
    from retrieval.training.trainer import TuneSummary

ModelOpt = Annotated[
    str | None,
    typer.Option("--model", "-m", help="open_clip architecture or .json config [default: the index's]."),
]
PretrainedOpt = Annotated[
    str | None,
    typer.Option("--pretrained", "-p", help="Pretrained tag, local checkpoint file/folder, or 'random'."),
]
IndexOpt = Annotated[
    Path | None,
    typer.Option("--index", "-i", help="Take the model of this index when --model is not given."),
]


def eval_command(
    dataset: Annotated[
        Path,
        typer.Argument(
            help="A TSV of image<TAB>caption or image<TAB>label (paths relative to it), a COCO captions "
            "JSON, or a folder with one subfolder per class (or with a captions.tsv)."
        ),
    ],
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    index_dir: IndexOpt = None,
    kind: Annotated[
        str, typer.Option("--kind", help="auto, captions or labels: what a TSV's second column holds.")
    ] = "auto",
    images: Annotated[
        Path | None, typer.Option("--images", help="The image folder of a COCO JSON (default: found beside).")
    ] = None,
    templates: Annotated[
        Path | None,
        typer.Option("--templates", help="Prompt templates for the ensemble, one a line with {}."),
    ] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    precision: Annotated[
        str, typer.Option("--precision", help="auto, fp32, bf16, fp16 (CUDA) or int8.")
    ] = "auto",
    backend: Annotated[
        str, typer.Option("--backend", help="auto, torch, onnx or openvino (images).")
    ] = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1)] = 64,
    workers: Annotated[int, typer.Option("--workers", min=0, help="Decoding threads (0: automatic).")] = 0,
    json_: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Retrieval quality on your own data: recall@1/5/10 and median rank both ways for captions,
    zero-shot top-1/top-5 with and without prompt ensembles for labels, against chance."""
    from indexer.embed_files import embed_image_files
    from indexer.model_choice import resolve_model_spec
    from retrieval.embedding.clip_model import ClipModel
    from retrieval.evaluation.datasets import load_dataset
    from retrieval.evaluation.evaluate import evaluate
    from retrieval.search.query import load_templates

    data = load_dataset(dataset, kind=kind, images=str(images) if images else None)
    tpl = load_templates(templates) if templates is not None else None
    spec = resolve_model_spec(index_dir, model, pretrained, device, precision, backend)
    clip = ClipModel(spec)
    progress = None if json_ else _progress(len(data.images))
    report = evaluate(
        data,
        lambda paths: embed_image_files(
            clip, paths, batch_size=batch_size, workers=workers, progress=progress
        ),
        clip.encode_texts,
        templates=tpl,
    )
    model_name = f"{clip.arch} / {spec.pretrained}"
    if json_:
        print(json.dumps({"model": model_name, **report.to_dict()}, indent=2))
    else:
        print_report(report, model_name)


def _progress(total: int):  # type: ignore[no-untyped-def]
    """A progress line on stderr while images are embedded (only on a terminal)."""
    if not sys.stderr.isatty():
        return None

    def show(done: int, _total: int) -> None:
        print(f"\rembedding images: {done}/{total}", end="" if done < total else "\n", file=sys.stderr)

    return show


def print_report(report: Report, model_name: str) -> None:
    from retrieval.evaluation.evaluate import CaptionReport

    print(f"model: {model_name}")
    print(f"data:  {report.source}")
    if isinstance(report, CaptionReport):
        print(f"       {report.images} images, {report.captions} captions")
        rows = [("text -> image", report.text_to_image), ("image -> text", report.image_to_text)]
    else:
        print(f"       {report.images} images, {report.classes} classes")
        rows = [("zero-shot", report.plain), ("zero-shot, ensemble", report.ensemble)]
    _print_table(rows)
    if report.missing or report.failed:
        print(f"left out: {report.missing} images not found, {len(report.failed)} unreadable")
        for path, reason in report.failed[:5]:
            print(f"  {path}: {reason}")
    print(f"embedding {report.embed_seconds:.1f} s, figures {report.metric_seconds:.2f} s")


def _print_table(rows: list[tuple[str, RankFigures]]) -> None:
    ks = list(rows[0][1].recall)
    name_width = max(len(name) for name, _ in rows) + 2
    head = "".join(f"{'R@' + str(k):>9}" for k in ks) + f"{'median':>9}{'queries':>9}"
    print(f"{'':<{name_width}}{head}")
    for name, fig in rows:
        cells = "".join(f"{100 * fig.recall[k]:>8.2f}%" for k in ks)
        print(f"{name:<{name_width}}{cells}{fig.median_rank:>9g}{fig.queries:>9}")
        chance = "".join(f"{100 * fig.chance_recall[k]:>8.2f}%" for k in ks)
        print(f"{'  chance':<{name_width}}{chance}{fig.chance_median_rank:>9g}{fig.candidates:>9}")


def tune_command(
    pairs: Annotated[
        Path,
        typer.Argument(
            help="Image-caption pairs: a TSV of image<TAB>caption (paths relative to it; several captions "
            "per image allowed), a COCO captions JSON, or a folder holding captions.tsv."
        ),
    ],
    model: Annotated[
        str, typer.Option("--model", "-m", help="open_clip architecture or .json config, e.g. clipdex-small.")
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="The checkpoint to write (an open_clip state_dict, for 'clipdex index --pretrained OUT'); "
            "the resume file OUT.resume is kept beside it until the run finishes.",
        ),
    ],
    pretrained: Annotated[
        str,
        typer.Option(
            "--pretrained", "-p", help="Start from a pretrained tag or checkpoint; 'random': from scratch."
        ),
    ] = "random",
    loss: Annotated[
        str,
        typer.Option("--loss", help="clip (InfoNCE, learnable temperature) or siglip (sigmoid, with bias)."),
    ] = "clip",
    epochs: Annotated[
        int,
        typer.Option(
            "--epochs",
            min=1,
            help="Length of the schedule (with --time-budget: at most; fitted to the time).",
        ),
    ] = 10,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=2)] = 64,
    lr: Annotated[float, typer.Option("--lr", min=0.0, help="Peak learning rate (AdamW).")] = 5e-4,
    weight_decay: Annotated[float, typer.Option("--weight-decay", min=0.0)] = 0.1,
    warmup: Annotated[
        int, typer.Option("--warmup", min=0, help="Steps of linear warm-up before the cosine decay.")
    ] = 100,
    lock_image: Annotated[
        bool, typer.Option("--lock-image", help="Keep the image tower as loaded (LiT): train the text side.")
    ] = False,
    freeze_layers: Annotated[
        int,
        typer.Option(
            "--freeze-layers", min=0, help="Keep the embeddings and the N lowest blocks of each tower fixed."
        ),
    ] = 0,
    holdout: Annotated[
        float,
        typer.Option(
            "--holdout",
            min=0.0,
            max=0.9,
            help="Share of the images kept out and evaluated after every epoch.",
        ),
    ] = 0.1,
    time_budget: Annotated[
        float | None,
        typer.Option(
            "--time-budget",
            min=0.0,
            help="Minutes of training: the schedule is shortened to end in time (speed measured on the first "
            "20 steps); the run stops at the budget regardless, saving what it has.",
        ),
    ] = None,
    max_steps: Annotated[
        int | None, typer.Option("--max-steps", min=1, help="Stop after this many steps in all.")
    ] = None,
    checkpoint_every: Annotated[
        int, typer.Option("--checkpoint-every", min=1, help="Steps between resume files.")
    ] = 100,
    resume: Annotated[
        bool | None,
        typer.Option(
            "--resume/--no-resume",
            help="Continue from OUT.resume [default: when it exists]; --no-resume refuses to overwrite it.",
        ),
    ] = None,
    workers: Annotated[
        int, typer.Option("--workers", min=0, help="DataLoader processes decoding and augmenting images.")
    ] = 2,
    threads: Annotated[int, typer.Option("--threads", min=0, help="torch threads (0: torch's choice).")] = 0,
    seed: Annotated[int, typer.Option("--seed", help="Random initialisation, split, order and crops.")] = 0,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda or cuda:N.")] = "cpu",
    json_: Annotated[bool, typer.Option("--json", help="Print a JSON summary at the end.")] = False,
) -> None:
    """Train or fine-tune an open_clip model on your image-caption pairs (CLIP or SigLIP loss),
    with a held-out split evaluated every epoch; resumable after a kill."""
    from retrieval.training.trainer import TuneOptions, tune

    options = TuneOptions(
        arch=model,
        out=out.expanduser().resolve(),
        pretrained=pretrained,
        loss=loss,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        warmup=warmup,
        lock_image=lock_image,
        freeze_layers=freeze_layers,
        holdout=holdout,
        time_budget=time_budget,
        max_steps=max_steps,
        checkpoint_every=checkpoint_every,
        workers=workers,
        seed=seed,
        resume=resume,
        threads=threads,
        device=device,
    )
    summary = tune(pairs, options, notify=_notify, progress=not json_ and sys.stderr.isatty())
    if json_:
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        _print_tune(summary)


def _notify(line: str) -> None:
    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)  # above the progress bar, not through it


def _print_tune(summary: TuneSummary) -> None:
    state = "finished" if summary.finished else f"stopped by the {summary.stopped_by}"
    print(
        f"{state} at step {summary.step} of {summary.total_steps} ({summary.images_per_second:.1f} images/s)"
    )
    print(f"checkpoint: {summary.out}")
    print(f"use it:     clipdex index FOLDER --model {summary.arch} --pretrained {summary.out}")
