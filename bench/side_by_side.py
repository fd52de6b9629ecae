"""rclip and clipdex indexing the same folder with the same model on the same CPU, side by side.

    .venv/bin/python bench/side_by_side.py /tmp/clipdex-camera --rounds 2 --json runs.json
    .venv/bin/python bench/side_by_side.py FOLDER --rounds 1 --searches 5   # and cold searches

Both tools run as a user runs them, whole process from start to exit, ALTERNATING (rclip,
clipdex, rclip, clipdex, ...) so that a busy spell on the machine hits both, each run into a
fresh index / database, with the page cache warm (every photo and the model files are read
once, untimed, first). Before the timed rounds each tool indexes a one-photo folder, untimed,
so that one-time work that a user pays once per model (clipdex's ONNX export of the image
tower into its cache, Python's bytecode cache) is not charged to the first round.

The model is rclip's only one, ViT-B-32-256, with the same seeded random weights in both tools:
../shared/peers/rclip_offline.sh (run automatically when its WORKDIR lacks rclip) installs rclip
3.3 into its own venv and exports the weights as rclip's ONNX files and as an open_clip
checkpoint for `clipdex index --model ViT-B-32-256 --pretrained CKPT`.

rclip has no index-only command: it indexes the current directory, then answers a query. Its
run is `rclip -t 1 -f QUERY` in the folder, so it also loads its text tower and answers one
query after indexing (well under a second); clipdex's `index` run exports its own text tower
for each new index, so both pay for a text tower.

Per run: wall seconds, images/s (files / wall), CPU% ((user+sys of the child) / wall, 100% is
one core), peak RSS of the child, and `others`, the share of the machine's CPUs that OTHER
processes used meanwhile (on a shared machine a high value means the run is pessimistic).
Both tools must index every file of the folder, or the script stops with the counts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from machine import busy_cpu_seconds, machine_facts

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PEERS = ROOT.parent / "shared" / "peers"
DEFAULT_WORKDIR = Path("/tmp/clipdex-peers")
MODEL = "ViT-B-32-256"
RCLIP_MODEL_SUBDIR = "ViT-B-32-256-datacomp_s34b_b86k"  # where rclip 3.3 looks for its ONNX files
# What both tools read: clipdex reads a few more (.jpe, heic with a plugin, avif), rclip a few
# more (jp2, pnm); a folder holding those would make the counts differ, so it is refused.
COMMON_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
ONE_TOOL_EXTENSIONS = {".jpe", ".heic", ".heif", ".avif", ".jp2", ".pnm", ".pbm", ".pgm", ".ppm"}


class BenchError(Exception):
    """Something that makes the comparison meaningless: printed as one line, exit status 1."""


@dataclass
class Run:
    tool: str
    round: int
    files: int
    wall_s: float
    user_s: float
    sys_s: float
    peak_rss_mib: float
    others_pct: float | None
    indexed: int
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return self.files / self.wall_s

    @property
    def cpu_pct(self) -> float:
        return 100.0 * (self.user_s + self.sys_s) / self.wall_s


@dataclass
class Rclip:
    binary: Path
    datadir: Path  # template: the model files, never written to (runs get their own datadir)
    checkpoint: Path


# ---------------------------------------------------------------- machine and inputs


def list_images(folder: Path) -> list[Path]:
    files, odd = [], []
    for dirpath, dirnames, filenames in os.walk(folder):
        # Hidden entries: clipdex skips them, so they must not count (rclip would read them).
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            suffix = Path(name).suffix.lower()
            if name.startswith("."):
                continue
            if suffix in COMMON_EXTENSIONS:
                files.append(Path(dirpath, name))
            elif suffix in ONE_TOOL_EXTENSIONS:
                odd.append(name)
    if odd:
        raise BenchError(f"{folder} holds files only one of the tools reads ({odd[0]}, ...): remove them")
    return sorted(files)


def warm_page_cache(paths: list[Path]) -> float:
    """Read every file once so that both tools find them in memory; returns MB read."""
    total = 0
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                total += len(chunk)
    return total / 1e6


def setup_rclip(peers: Path, workdir: Path) -> Rclip:
    tool = Rclip(
        workdir / "venv-rclip" / "bin" / "rclip",
        workdir / "datadir",
        workdir / "datadir" / f"{MODEL}-seed0.pt",
    )
    if tool.binary.is_file() and tool.checkpoint.is_file():
        return tool
    script = peers / "rclip_offline.sh"
    if not script.is_file():
        raise BenchError(f"rclip set-up script not found: {script} (pass --peers DIR)")
    print(f"setting rclip up in {workdir} (once) ...", flush=True)
    # The exporter needs torch, open_clip and onnx: this script's own interpreter (the project venv).
    done = subprocess.run(["bash", str(script), str(workdir), sys.executable], capture_output=True, text=True)
    if done.returncode != 0 or not tool.binary.is_file() or not tool.checkpoint.is_file():
        raise BenchError(f"rclip set-up failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
    return tool


def fresh_rclip_datadir(template: Path, where: Path) -> Path:
    """A datadir of its own (rclip writes db.sqlite3 there) whose model files are links to the
    template's: no 600 MB copy per run, and the page cache stays warm."""
    where.mkdir(parents=True)
    for name in (RCLIP_MODEL_SUBDIR, "tokenizer"):
        os.symlink(template / name, where / name)
    return where


# ---------------------------------------------------------------- running one child


@dataclass
class Child:
    stdout: str
    stderr: str
    wall_s: float
    user_s: float
    sys_s: float
    peak_rss_mib: float
    others_pct: float | None


def run_child(cmd: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> Child:
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        busy0 = busy_cpu_seconds()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=cwd, env=env)
        # wait4 gives this child's own rusage (with its waited-for descendants), unlike
        # RUSAGE_CHILDREN, which sums every child this script ever had.
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        busy1 = busy_cpu_seconds()
        code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if code != 0:
        tail = stderr.strip().splitlines()[-1:] or ["(no message)"]
        raise BenchError(f"exit status {code}: {' '.join(cmd)}: {tail[0]}")
    own = usage.ru_utime + usage.ru_stime
    others = None
    if busy0 is not None and busy1 is not None:
        others = max(0.0, 100.0 * (busy1 - busy0 - own) / (wall * (os.cpu_count() or 1)))
    return Child(stdout, stderr, wall, usage.ru_utime, usage.ru_stime, usage.ru_maxrss / 1024, others)


# ---------------------------------------------------------------- the two tools


def run_rclip(tool: Rclip, folder: Path, datadir: Path, query: str, extra: list[str]) -> tuple[Child, int]:
    env = dict(os.environ, RCLIP_DATADIR=str(datadir), HF_HUB_OFFLINE="1")
    child = run_child([str(tool.binary), "-t", "1", "-f", *extra, query], cwd=folder, env=env)
    with sqlite3.connect(datadir / "db.sqlite3") as db:
        (indexed,) = db.execute("SELECT COUNT(*) FROM images WHERE deleted IS NULL").fetchone()
    return child, int(indexed)


def run_clipdex(
    clipdex: Path, folder: Path, index: Path, checkpoint: Path, extra: list[str]
) -> tuple[Child, int, dict[str, Any]]:
    cmd = [str(clipdex), "index", str(folder), "--index", str(index), "--model", MODEL]
    cmd += ["--pretrained", str(checkpoint), "--device", "cpu", "--json", *extra]
    child = run_child(cmd)
    try:
        summary = json.loads(child.stdout)
    except ValueError:
        summary = {}
    # The count comes from the index itself (a separate, untimed process), not from the summary.
    info = run_child([str(clipdex), "info", "--json", "--index", str(index)])
    return child, int(json.loads(info.stdout)["images"]), summary


def _summary_details(summary: dict[str, Any]) -> dict[str, Any]:
    keys = ("seconds", "decode_seconds", "model_seconds", "embed_seconds", "images_per_second", "failed")
    return {k: summary[k] for k in keys if k in summary}


def one_round(
    args: argparse.Namespace, tool: Rclip, folder: Path, files: int, work: Path, rnd: int
) -> list[Run]:
    runs = []
    datadir = fresh_rclip_datadir(tool.datadir, work / f"rclip-{rnd}")
    child, indexed = run_rclip(tool, folder, datadir, args.query, args.rclip_args.split())
    skipped = [line for line in child.stderr.splitlines() if line.startswith("skipping")]
    runs.append(_run("rclip", rnd, files, child, indexed, {"skipped": skipped[:5]}))
    print(_row(runs[-1]), flush=True)
    child, indexed, summary = run_clipdex(
        args.clipdex, folder, work / f"clipdex-{rnd}", tool.checkpoint, args.index_args.split()
    )
    runs.append(_run("clipdex", rnd, files, child, indexed, _summary_details(summary)))
    print(_row(runs[-1]), flush=True)
    for run in runs[-2:]:
        if run.indexed != files:
            raise BenchError(
                f"{run.tool} indexed {run.indexed} of the {files} files in round {run.round}"
                f" ({_why(run)}): the comparison would be meaningless"
            )
    return runs


def cold_searches(
    args: argparse.Namespace, tool: Rclip, folder: Path, work: Path, rnd: int
) -> dict[str, Any]:
    """Each tool answers `--searches` new text queries from a cold process, alternating, on the
    index it built in round `rnd`: rclip with --no-indexing (its index is up to date), clipdex
    with `search`. Every query is new (numbered), so neither answers from a cache."""
    rclip_env = dict(os.environ, RCLIP_DATADIR=str(work / f"rclip-{rnd}"), HF_HUB_OFFLINE="1")
    index = work / f"clipdex-{rnd}"
    walls: dict[str, list[float]] = {"rclip": [], "clipdex": []}
    rss: dict[str, list[float]] = {"rclip": [], "clipdex": []}
    for i in range(args.searches):
        query = f"{args.query} number {i}"
        runs = {
            "rclip": run_child([str(tool.binary), "-n", "-t", "10", "-f", query], cwd=folder, env=rclip_env),
            "clipdex": run_child(
                [str(args.clipdex), "search", query, "--index", str(index), "-k", "10", "--paths"]
            ),
        }
        for name, child in runs.items():
            walls[name].append(child.wall_s)
            rss[name].append(child.peak_rss_mib)
        print(
            f"cold search {i + 1}: rclip {runs['rclip'].wall_s:.2f} s, clipdex {runs['clipdex'].wall_s:.2f} s"
            f" (others {runs['clipdex'].others_pct or 0:.0f}%)",
            flush=True,
        )
    result = {
        name: {"median_s": statistics.median(w), "peak_rss_mib": statistics.median(rss[name])}
        for name, w in walls.items()
    }
    result["time_ratio"] = result["clipdex"]["median_s"] / result["rclip"]["median_s"]  # <1: clipdex faster
    print(
        f"cold search, median of {args.searches}: rclip {result['rclip']['median_s']:.2f} s,"
        f" clipdex {result['clipdex']['median_s']:.2f} s:"
        f" clipdex takes {result['time_ratio']:.2f}x rclip's time"
    )
    return result


def _why(run: Run) -> str:
    reasons = run.details.get("failed") or run.details.get("skipped") or []
    return f"first: {reasons[0]}" if reasons else "no reason given"


def _run(tool: str, rnd: int, files: int, child: Child, indexed: int, details: dict[str, Any]) -> Run:
    return Run(
        tool=tool,
        round=rnd,
        files=files,
        wall_s=child.wall_s,
        user_s=child.user_s,
        sys_s=child.sys_s,
        peak_rss_mib=child.peak_rss_mib,
        others_pct=child.others_pct,
        indexed=indexed,
        details=details,
    )


def warm_up(args: argparse.Namespace, tool: Rclip, first: Path, work: Path) -> None:
    """Each tool indexes one photo, untimed: one-time per-model work is not charged to a round."""
    one = work / "one-photo"
    one.mkdir()
    shutil.copy2(first, one / first.name)
    rclip, _ = run_rclip(tool, one, fresh_rclip_datadir(tool.datadir, work / "rclip-warm"), args.query, [])
    clipdex, _, _ = run_clipdex(args.clipdex, one, work / "clipdex-warm", tool.checkpoint, [])
    print(
        f"warm-up, one photo (untimed; clipdex's first may include its one-time ONNX export):"
        f" rclip {rclip.wall_s:.1f} s {rclip.peak_rss_mib:.0f} MiB,"
        f" clipdex {clipdex.wall_s:.1f} s {clipdex.peak_rss_mib:.0f} MiB",
        flush=True,
    )


# ---------------------------------------------------------------- report


HEADER = f"{'tool':8} {'round':>5} {'wall s':>8} {'images/s':>9} {'CPU %':>6} {'peak RSS':>10} {'others':>7}"


def _row(run: Run | None, label: str = "", **median: float) -> str:
    if run is not None:
        others = "" if run.others_pct is None else f"{run.others_pct:6.0f}%"
        return (
            f"{run.tool:8} {run.round:>5} {run.wall_s:8.1f} {run.images_per_s:9.2f} {run.cpu_pct:6.0f}"
            f" {run.peak_rss_mib:6.0f} MiB {others:>7}"
        )
    return (
        f"{label:8} {'median':>5} {median['wall']:8.1f} {median['ips']:9.2f} {median['cpu']:6.0f}"
        f" {median['rss']:6.0f} MiB"
    )


def medians(runs: list[Run], tool: str) -> dict[str, float]:
    mine = [r for r in runs if r.tool == tool]
    return {
        "wall": statistics.median(r.wall_s for r in mine),
        "ips": statistics.median(r.images_per_s for r in mine),
        "cpu": statistics.median(r.cpu_pct for r in mine),
        "rss": statistics.median(r.peak_rss_mib for r in mine),
    }


def summarize(runs: list[Run], facts: dict[str, Any]) -> dict[str, Any]:
    rclip, clipdex = medians(runs, "rclip"), medians(runs, "clipdex")
    speed = rclip["wall"] / clipdex["wall"]  # >1: clipdex is faster
    memory = clipdex["rss"] / rclip["rss"]  # <1: clipdex needs less
    print()
    print(HEADER)
    print(_row(None, "rclip", **rclip))
    print(_row(None, "clipdex", **clipdex))
    print(f"clipdex / rclip: speed {speed:.2f}x (median wall), peak RSS {memory:.2f}x")
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in facts["flags"].items())
    print(f"machine: {facts['cpu']}, {facts['usable_cores']} of {facts['cores']} cores usable; {flags}")
    return {"rclip": rclip, "clipdex": clipdex, "speed_ratio": speed, "rss_ratio": memory}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folder", help="Photo folder (e.g. made by bench/camera_photos.py).")
    parser.add_argument("--rounds", type=int, default=2, help="Alternating rounds (rclip, then clipdex).")
    parser.add_argument("--limit", type=int, help="Only the first N photos (copied to a temporary folder).")
    parser.add_argument("--peers", type=Path, default=DEFAULT_PEERS, help="Folder of rclip_offline.sh.")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="rclip's venv and model files.")
    parser.add_argument("--clipdex", type=Path, default=Path(sys.executable).parent / "clipdex")
    parser.add_argument("--index-args", default="", help="Extra options for 'clipdex index', quoted.")
    parser.add_argument("--rclip-args", default="", help="Extra options for rclip, quoted.")
    parser.add_argument("--query", default="a photo of a dog", help="The query rclip answers after indexing.")
    parser.add_argument(
        "--searches",
        type=int,
        default=0,
        help="Then N cold text searches each, alternating, on the last round's index.",
    )
    parser.add_argument("--no-warm-up", dest="warm_up", action="store_false")
    parser.add_argument("--json", type=Path, help="Write the machine facts and every run here.")
    args = parser.parse_args()
    try:
        bench(args)
    except BenchError as exc:
        sys.exit(f"side_by_side: {exc}")


def bench(args: argparse.Namespace) -> None:
    folder = Path(args.folder).resolve()
    if not folder.is_dir():
        raise BenchError(f"folder not found: {args.folder}")
    if args.rounds < 1:
        raise BenchError("--rounds must be at least 1")
    if not args.clipdex.is_file():
        raise BenchError(f"clipdex command not found: {args.clipdex} (pass --clipdex PATH)")
    files = list_images(folder)
    if not files:
        raise BenchError(f"no images in {folder}")
    tool = setup_rclip(args.peers, args.workdir.resolve())
    work = Path(tempfile.mkdtemp(prefix="clipdex-side-"))
    try:
        if args.limit:
            folder = work / "photos"
            folder.mkdir()
            for f in files[: args.limit]:
                shutil.copy2(f, folder / f.name)
            files = list_images(folder)
        facts = machine_facts()
        megabytes = warm_page_cache(files + [tool.checkpoint, *sorted(tool.datadir.rglob("*.onnx"))])
        print(
            f"{len(files)} images in {folder} (page cache warmed: {megabytes:.0f} MB read),"
            f" model {MODEL} (seeded random weights), {args.rounds} alternating rounds",
            flush=True,
        )
        if args.warm_up:
            warm_up(args, tool, files[0], work)
        print(HEADER)
        runs: list[Run] = []
        for rnd in range(1, args.rounds + 1):
            runs += one_round(args, tool, folder, len(files), work, rnd)
        result = summarize(runs, facts)
        if args.searches:
            result["cold_search"] = cold_searches(args, tool, folder, work, args.rounds)
        if args.json:
            record = {
                "folder": str(Path(args.folder).resolve()),
                "files": len(files),
                "model": MODEL,
                "machine": facts,
                "arguments": {k: str(v) for k, v in vars(args).items()},
                "summary": result,
                "runs": [{**asdict(r), "images_per_s": r.images_per_s, "cpu_pct": r.cpu_pct} for r in runs],
            }
            args.json.write_text(json.dumps(record, indent=1))
            print(f"raw runs: {args.json}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
