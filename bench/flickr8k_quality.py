"""Retrieval quality before and after training from random weights on the CPU (issue 14).

    .venv/bin/python bench/flickr8k_quality.py --budget 30

1. `clipdex eval` on the test split with the architecture's seeded random weights (the "before");
2. `clipdex tune` on the train split from those weights, for at most `--budget` minutes;
3. `clipdex eval` on the test split with the checkpoint it wrote (the "after").

Prints one JSON object: the commands, text-to-image and image-to-text figures (recall@1/5/10,
median rank, chance) before and after, the training summary (steps, images/s, held-out figures
per epoch), wall times and the machine. The datasets live outside the project
(../shared/datasets); pass other folders with --train / --test. The machine is shared: figures
are preliminary, and the throughput depends on how busy it is.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from machine import machine_facts

ROOT = Path(__file__).resolve().parents[1]
_SCRIPT = Path(sys.executable).with_name("clipdex")
CLIPDEX = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "cli.main"]
DATASETS = ROOT.parent / "shared" / "datasets"


def run_json(args: list[str], env: dict[str, str]) -> tuple[dict, float, str]:
    started = time.monotonic()
    proc = subprocess.run(CLIPDEX + args, env=env, cwd=ROOT, capture_output=True, text=True)
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        sys.exit(f"failed: {shlex.join(CLIPDEX + args)}\n{proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout), seconds, proc.stderr


def figures(report: dict) -> dict:
    keep = ("recall", "median_rank", "chance_recall", "chance_median_rank", "queries", "candidates")
    return {d: {k: report[d][k] for k in keep} for d in ("text_to_image", "image_to_text")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=Path, default=DATASETS / "flickr8k-train")
    ap.add_argument("--test", type=Path, default=DATASETS / "flickr8k-test")
    ap.add_argument("--model", default="clipdex-small")
    ap.add_argument("--budget", type=float, default=30.0, help="Minutes of training (at most).")
    ap.add_argument("--epochs", type=int, default=30, help="At most; the schedule is fitted to the budget.")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--holdout", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on a busy machine).")
    ap.add_argument("--workers", type=int, default=1, help="DataLoader processes.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("/tmp/clipdex-flickr8k/tuned.pt"))
    args = ap.parse_args()
    for folder in (args.train, args.test):
        if not folder.exists():
            sys.exit(f"dataset not found: {folder} (pass --train / --test)")
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    common = ["--model", args.model, "--device", "cpu", "--json"]

    before_args = ["eval", str(args.test), *common, "--pretrained", "random"]
    before, before_s, _ = run_json(before_args, env)

    tune_args = ["tune", str(args.train), *common, "--pretrained", "random", "--out", str(args.out)]
    tune_args += ["--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--lr", str(args.lr)]
    tune_args += ["--warmup", str(args.warmup), "--holdout", str(args.holdout), "--seed", str(args.seed)]
    tune_args += ["--time-budget", str(args.budget), "--threads", str(args.threads)]
    tune_args += ["--workers", str(args.workers)]
    tuned, tune_s, _ = run_json(tune_args, env)

    after_args = ["eval", str(args.test), *common, "--pretrained", str(args.out)]
    after, after_s, _ = run_json(after_args, env)

    print(
        json.dumps(
            {
                "label": "preliminary (shared machine)",
                "commands": {
                    "before": shlex.join(["clipdex", *before_args]),
                    "tune": shlex.join(["clipdex", *tune_args]),
                    "after": shlex.join(["clipdex", *after_args]),
                },
                "before": figures(before),
                "after": figures(after),
                "tune": tuned,
                "seconds": {
                    "eval_before": round(before_s, 1),
                    "tune": round(tune_s, 1),
                    "eval_after": round(after_s, 1),
                },
                "machine": machine_facts(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
