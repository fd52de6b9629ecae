"""`clipdex tune`: learns, survives a kill, and writes a checkpoint every command accepts.

The pairs are generated: a picture dominated by one of four colours, captioned with that colour,
so that even the tiny model can learn something in a few steps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from conftest import TINY_ARCH
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from cli.main import app
from retrieval.core.errors import ClipdexError
from retrieval.embedding.spec import CONFIG_DIR
from retrieval.training.checkpoint import resume_path
from retrieval.training.trainer import TuneOptions, fit_total_steps, tune

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
_SCRIPT = Path(sys.executable).with_name("clipdex")
CLIPDEX = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "cli.main"]


def colour_pairs(folder: Path, per_colour: int = 8) -> Path:
    """Pictures of one main colour with a few shapes of other colours on it, two captions each."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for name, rgb in COLOURS.items():
        for i in range(per_colour):
            base = np.clip(np.array(rgb) + rng.integers(-25, 26, 3), 0, 255)
            img = Image.new("RGB", (72, 72), tuple(int(c) for c in base))
            draw = ImageDraw.Draw(img)
            for _ in range(2):
                x, y = (int(v) for v in rng.integers(0, 56, 2))
                draw.rectangle((x, y, x + 14, y + 14), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
            file = f"{name}{i}.png"
            img.save(folder / file)
            rows += [f"{file}\ta {name} picture", f"{file}\tsomething {name}"]
    (folder / "pairs.tsv").write_text("\n".join(rows) + "\n")
    return folder / "pairs.tsv"


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return colour_pairs(tmp_path_factory.mktemp("pairs"))


@pytest.fixture(autouse=True)
def _restore_threads():
    """Runs here use one torch thread (options()): several times faster than two on a busy machine,
    and runs compared for equality do the same arithmetic in the same order."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def options(out: Path, **kw) -> TuneOptions:
    base = dict(arch=TINY_ARCH, out=out, epochs=3, batch_size=8, lr=2e-3, warmup=2, holdout=0.0, workers=0)
    base["threads"] = 1
    base.update(kw)
    return TuneOptions(**base)


def open_clip_model(checkpoint: Path | None, seed: int = 0):
    open_clip.add_model_config(CONFIG_DIR)
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_ARCH, pretrained=str(checkpoint) if checkpoint else None)
    return model.eval()


def pair_loss(model, pairs_tsv: Path) -> float:
    """open_clip's ClipLoss over all pairs at once (first caption of each image), eval transform."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    rows = [line.split("\t") for line in pairs_tsv.read_text().splitlines()][::2]
    preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    tokenizer = open_clip.get_tokenizer(TINY_ARCH)
    with torch.no_grad():
        images = torch.stack([preprocess(Image.open(pairs_tsv.parent / f)) for f, _ in rows])
        out = model(images, tokenizer([c for _, c in rows]))
        return float(open_clip.ClipLoss()(out[0], out[1], out[2]))


def test_loss_decreases_and_the_held_out_split_is_reported(pairs: Path, tmp_path: Path):
    out = tmp_path / "tuned.pt"
    notes: list[str] = []
    summary = tune(pairs, options(out, epochs=4, holdout=0.25), notify=notes.append)
    assert summary.finished and summary.step == summary.total_steps == 4 * (24 // 8)
    assert not resume_path(out).exists()  # a finished run leaves no resume file
    assert pair_loss(open_clip_model(out), pairs) < pair_loss(open_clip_model(None), pairs)
    assert summary.losses[-1] < summary.losses[0]
    # The held-out split (8 images, 16 captions) before training and after each epoch.
    assert summary.before is not None and summary.before.queries == 16 and summary.before.candidates == 8
    assert [e.epoch for e in summary.history] == [1, 2, 3, 4]
    assert all(e.heldout is not None and e.heldout.candidates == 8 for e in summary.history)
    assert sum("epoch" in n and "held-out" in n for n in notes) == 4


def test_siglip_learns_its_bias_and_the_checkpoint_keeps_it(pairs: Path, tmp_path: Path):
    with pytest.raises(ClipdexError, match="logit bias"):
        tune(pairs, options(tmp_path / "x.pt", loss="siglip"))
    out = tmp_path / "siglip.pt"
    summary = tune(pairs, options(out, arch="clipdex-small-sigmoid", loss="siglip", epochs=1, batch_size=16))
    assert summary.finished
    open_clip.add_model_config(CONFIG_DIR)
    model = open_clip.create_model("clipdex-small-sigmoid", pretrained=str(out))
    assert model.logit_bias.detach().item() != -10.0  # trained, saved and loaded back


def test_lock_image_and_freeze_layers_keep_those_weights(pairs: Path, tiny_checkpoint: Path, tmp_path: Path):
    start = open_clip_model(tiny_checkpoint).state_dict()
    locked = tmp_path / "lit.pt"
    tune(pairs, options(locked, pretrained=str(tiny_checkpoint), lock_image=True, epochs=1))
    frozen = tmp_path / "frozen.pt"
    tune(pairs, options(frozen, pretrained=str(tiny_checkpoint), freeze_layers=1, epochs=1))
    lit, fro = torch.load(locked), torch.load(frozen)
    assert all(torch.equal(lit[k], start[k]) for k in start if k.startswith("visual."))
    assert not torch.equal(lit["text_projection"], start["text_projection"])
    for key in (
        "visual.transformer.resblocks.0.attn.in_proj_weight",
        "transformer.resblocks.0.mlp.c_fc.weight",
    ):
        assert torch.equal(fro[key], start[key])
    for key in (
        "visual.transformer.resblocks.1.attn.in_proj_weight",
        "transformer.resblocks.1.mlp.c_fc.weight",
    ):
        assert not torch.equal(fro[key], start[key])
    with pytest.raises(ClipdexError, match="freeze-layers 5"):
        tune(pairs, options(tmp_path / "y.pt", freeze_layers=5))


def test_an_out_that_cannot_take_a_checkpoint_is_refused_before_training(pairs: Path, tmp_path: Path):
    for out in (tmp_path, tmp_path / "missing" / "x.pt"):  # a folder; a file in no folder
        with pytest.raises(ClipdexError, match="give a checkpoint file in an existing folder"):
            tune(pairs, options(out))


def test_a_killed_run_resumes_where_it_stopped_and_ends_as_an_unbroken_one(pairs: Path, tmp_path: Path):
    """SIGKILL after the first resume file; the resumed run's weights equal those of a run that
    was never stopped (same batches, same crops, same optimiser state)."""
    epochs, stop_at = 40, 12  # 120 steps planned; both runs stop at step 12 (the schedule is the same)
    reference = tune(pairs, options(tmp_path / "ref.pt", epochs=epochs, max_steps=stop_at))
    assert reference.stopped_by == "max steps" and reference.step == stop_at

    out = tmp_path / "run.pt"
    args = ["tune", str(pairs), "--model", TINY_ARCH, "--out", str(out), "--epochs", str(epochs)]
    args += ["--batch-size", "8", "--lr", "2e-3", "--warmup", "2", "--holdout", "0", "--workers", "0"]
    args += ["--threads", "1", "--checkpoint-every", "2"]
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    proc = subprocess.Popen(
        CLIPDEX + args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        for line in proc.stderr:  # the event: the child says it wrote a resume file
            if line.startswith("checkpoint: step"):
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert resume_path(out).is_file()

    notes: list[str] = []
    resumed = tune(pairs, options(out, epochs=epochs, max_steps=stop_at), notify=notes.append)
    assert resumed.resumed_from is not None and 2 <= resumed.resumed_from < stop_at
    assert any(n.startswith(f"resumed from step {resumed.resumed_from}") for n in notes)
    assert resumed.step == stop_at
    want, got = torch.load(tmp_path / "ref.pt"), torch.load(out)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want), [
        k for k in want if not torch.equal(want[k], got[k])
    ]

    # Other settings than the resume file's are refused, not mixed.
    with pytest.raises(ClipdexError, match="other settings"):
        tune(pairs, options(out, epochs=epochs, lr=1e-3))


def test_the_checkpoint_round_trips_through_index_and_search(pairs: Path, tmp_path: Path):
    out = tmp_path / "tuned.pt"
    runner = CliRunner()
    tuned = runner.invoke(
        app,
        [
            "tune",
            str(pairs),
            "-m",
            TINY_ARCH,
            "-o",
            str(out),
            "--epochs",
            "1",
            "-b",
            "8",
            "--threads",
            "1",
            "--json",
        ],
        catch_exceptions=False,
    )
    assert tuned.exit_code == 0, tuned.output
    assert json.loads(tuned.stdout)["finished"] is True  # default --workers 2: the DataLoader processes

    index = tmp_path / "index"
    args = ["index", str(pairs.parent), "--index", str(index), "--model", TINY_ARCH, "--pretrained", str(out)]
    assert runner.invoke(app, args, catch_exceptions=False).exit_code == 0
    found = runner.invoke(
        app, ["search", "a red picture", "--index", str(index), "-k", "5", "--json"], catch_exceptions=False
    )
    assert found.exit_code == 0, found.output
    hits = json.loads(found.stdout)

    # The same ranking straight from open_clip with that checkpoint.
    from open_clip.transform import PreprocessCfg, image_transform_v2

    model = open_clip_model(out)
    preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    files = sorted(pairs.parent.glob("*.png"))
    with torch.no_grad():
        images = model.encode_image(torch.stack([preprocess(Image.open(f)) for f in files]), normalize=True)
        text = model.encode_text(open_clip.get_tokenizer(TINY_ARCH)(["a red picture"]), normalize=True)
    scores = (images @ text.T).squeeze(1).numpy()
    order = np.argsort(-scores)[:5]
    assert [Path(h["path"]).name for h in hits] == [files[i].name for i in order]
    np.testing.assert_allclose([h["score"] for h in hits], scores[order], atol=1e-5)


def test_a_time_budget_shortens_the_schedule_to_what_fits():
    # 20 steps done, 600 s left at 2 s a step plus 0.5 s of held-out evaluation per step.
    assert fit_total_steps(20, 1000, 600.0, 2.0, 0.5) == 20 + int(0.98 * 600 / 2.5)
    assert fit_total_steps(20, 100, 600.0, 2.0, 0.0) == 100  # never beyond the epochs asked for
    assert fit_total_steps(20, 1000, 0.0, 2.0, 0.0) == 21  # time is up: end at the next step
