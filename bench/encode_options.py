"""Which way of embedding images is fastest on this CPU, and which ones keep the embeddings faithful.

    .venv/bin/python bench/encode_options.py [--data DIR] [--limit 256] [--json out.json]

Measures the image model ALONE, on images decoded and preprocessed beforehand: torch float32 at
several batch sizes and thread counts, bfloat16 autocast, torch.compile, ONNX Runtime float32
(and its session options) and dynamically quantised int8. Every option other than torch
float32 is checked against torch float32 embeddings of the same images: mean and minimum cosine
(faithful means mean >= 0.999 and min >= 0.995) and agreement of the 10 nearest neighbours.
Then the cost of decoding (full decode vs reduced-scale JPEG "draft" decoding) and whether a
decoding thread slows inference down when both share the CPU.

    .venv/bin/python bench/encode_options.py --suite precision --model ViT-B-32-256 \
        --pretrained CHECKPOINT --limit 200 [--batches 8,16,32] [--options ORT,OpenVINO]

The precision suite (issue 10) only: ONNX Runtime float32 (the CPU default without native bf16),
torch float32 / bf16 autocast / bf16 weights, ONNX Runtime dynamic int8 (MLP MatMuls only, and
all weight MatMuls: what --precision int8 runs), OpenVINO float32 and bf16 (what the openvino
backend runs) and, with nncf importable, OpenVINO static int8 calibrated on --calib other photos.
Fidelity on all images, then every (option, batch) timed round-robin.

Throughput is images/s of the median full batch (a batch slowed by another process then moves
the median little); `cpu ms/img` is this process's CPU time per image; `others` is the share of
the machine's CPUs that OTHER processes used meanwhile: on a shared machine a high value means
that row's wall-clock numbers are pessimistic.

Random weights (the default) give the same speed as trained ones; fidelity of lossy options
(bf16, int8) depends on the weights, so re-run with --pretrained on the real checkpoint before
relying on one of those.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable as a plain script from any directory

from machine import busy_cpu_seconds, cpu_name, flags_of_interest  # noqa: E402

from retrieval.core.images import load_image  # noqa: E402
from retrieval.embedding.clip_model import ClipModel  # noqa: E402
from retrieval.embedding.onnx_image_tower import OnnxImageEncoder, export_image_tower, session_options  # noqa: E402
from retrieval.embedding.openvino_image_tower import OpenVinoImageEncoder  # noqa: E402
from retrieval.embedding.spec import ModelSpec  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "imagenet-sample"
MEAN_COS_REQUIRED = 0.999
MIN_COS_REQUIRED = 0.995
KNN = 10
QUIET = 0.10  # a batch is "quiet" when other processes used under 10% of the machine's CPUs

Encoder = Callable[[np.ndarray], np.ndarray]  # float32 (N, 3, H, W) -> unit-norm float32 (N, dim)


# ---------------------------------------------------------------- measuring on a shared machine


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system  # all threads of this process (not children)


NCPU = os.cpu_count() or 1


@dataclass
class Sample:
    """One timed stretch: wall seconds, our CPU seconds, and other processes' CPU seconds."""

    wall: float = 0.0
    cpu: float = 0.0
    others_cpu: float | None = 0.0

    def __iadd__(self, other: Sample) -> Sample:
        self.wall += other.wall
        self.cpu += other.cpu
        if self.others_cpu is None or other.others_cpu is None:
            self.others_cpu = None
        else:
            self.others_cpu += other.others_cpu
        return self

    @property
    def others_share(self) -> float | None:
        if self.others_cpu is None or self.wall <= 0:
            return None
        return max(0.0, self.others_cpu / (self.wall * NCPU))


@contextmanager
def measure() -> Iterator[Sample]:
    sample = Sample()
    busy0, cpu0, t0 = busy_cpu_seconds(), _own_cpu(), time.perf_counter()
    yield sample
    sample.wall = time.perf_counter() - t0
    sample.cpu = _own_cpu() - cpu0
    busy1 = busy_cpu_seconds()
    sample.others_cpu = None if busy0 is None or busy1 is None else max(0.0, busy1 - busy0 - sample.cpu)


def wait_until_quiet(max_wait: float, threshold: float = 0.15) -> None:
    """Wait (at most max_wait s) until other processes use under `threshold` of the CPUs, so a
    measurement starts in a quiet moment if the machine has them. The rows report the load anyway."""
    deadline = time.monotonic() + max_wait
    while time.monotonic() < deadline:
        with measure() as s:
            time.sleep(0.5)
        share = s.others_share
        if share is None or share < threshold:
            return


# ---------------------------------------------------------------- timing one option


@dataclass
class Timing:
    """Per full batch: wall seconds, our CPU seconds, other processes' CPU seconds."""

    batch: int
    samples: list[Sample] = field(default_factory=list)

    @property
    def images(self) -> int:
        return self.batch * len(self.samples)

    @property
    def rate(self) -> float:
        return self._rate(self.samples)

    @property
    def quiet(self) -> list[Sample]:
        """Batches during which other processes used under QUIET of the machine's CPUs."""
        return [s for s in self.samples if s.others_share is not None and s.others_share < QUIET]

    @property
    def quiet_rate(self) -> float:
        return self._rate(self.quiet)

    def _rate(self, samples: Sequence[Sample]) -> float:
        return self.batch / statistics.median(s.wall for s in samples) if samples else float("nan")

    @property
    def total(self) -> Sample:
        total = Sample()
        for s in self.samples:
            total += s
        return total

    @property
    def cpu_ms_per_image(self) -> float:
        return 1000 * self.total.cpu / self.images if self.images else float("nan")

    def summary(self) -> dict[str, Any]:
        return {
            "batch": self.batch,
            "img_per_s": self.rate,
            "quiet_img_per_s": self.quiet_rate,
            "quiet_batches": len(self.quiet),
            "cpu_ms_per_img": self.cpu_ms_per_image,
            "others_share": self.total.others_share,
            "batches": [asdict(s) for s in self.samples],
        }


def run_pass(
    encode: Encoder, pixels: np.ndarray, batch: int, warmup: bool = True
) -> tuple[np.ndarray, Timing]:
    """Embed all of `pixels` in batches; time each full batch (a trailing partial batch is
    embedded for fidelity but not timed: its rate is not the batch size's)."""
    if warmup:  # first call allocates, picks kernels, compiles: not steady-state speed
        encode(pixels[:batch])
    timing = Timing(batch)
    parts = []
    for start in range(0, len(pixels), batch):
        chunk = pixels[start : start + batch]
        with measure() as s:
            parts.append(encode(chunk))
        if len(chunk) == batch:
            timing.samples.append(s)
    return np.concatenate(parts), timing


@dataclass
class Fidelity:
    mean_cos: float
    min_cos: float
    knn_agreement: float | None  # mean share of each image's 10 nearest neighbours kept

    @property
    def passes(self) -> bool:
        return self.mean_cos >= MEAN_COS_REQUIRED and self.min_cos >= MIN_COS_REQUIRED


def fidelity(test: np.ndarray, ref: np.ndarray) -> Fidelity:
    cos = np.sum(test.astype(np.float64) * ref, axis=1)
    return Fidelity(float(cos.mean()), float(cos.min()), _knn_agreement(test, ref))


def _knn_agreement(test: np.ndarray, ref: np.ndarray, k: int = KNN) -> float | None:
    """Retrieval is what matters: do the same images stay each other's nearest neighbours?"""
    n = len(ref)
    if n <= k:
        return None

    def neighbours(v: np.ndarray) -> np.ndarray:
        sim = v @ v.T
        np.fill_diagonal(sim, -np.inf)
        return np.argsort(-sim, axis=1)[:, :k]

    a, b = neighbours(ref), neighbours(test)
    return float(np.mean([len(set(a[i]) & set(b[i])) / k for i in range(n)]))


@dataclass
class Row:
    """One option: how it is called, and what was measured."""

    option: str
    batch: int
    threads: int
    encode: Encoder | None = None  # None: not re-timed in the extra rounds
    timing: Timing | None = None
    fid: Fidelity | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "option": self.option,
            "batch": self.batch,
            "threads": self.threads,
            "timing": self.timing.summary() if self.timing else None,
            "fidelity": asdict(self.fid) if self.fid else None,
            "note": self.note,
        }


def extra_rounds(
    rows: Sequence[Row], pixels: np.ndarray, rounds: int, images: int, quiet_wait: float
) -> None:
    """Time every option again, a few batches each, round-robin: on a shared machine another
    user's job then slows all options alike instead of whichever happened to run alongside it,
    and more batches fall into quiet moments."""
    for r in range(rounds):
        for row in rows:
            if row.encode is None or row.timing is None:
                continue
            wait_until_quiet(quiet_wait)
            count = max(row.batch, images // row.batch * row.batch)
            _, timing = run_pass(row.encode, pixels[:count], row.batch)
            row.timing.samples.extend(timing.samples)
        print(f"  round {r + 1}/{rounds} done", flush=True)


# ---------------------------------------------------------------- the options


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def torch_encoder(clip: ClipModel, threads: int, bf16: bool = False) -> Encoder:
    import torch

    def encode(pixels: np.ndarray) -> np.ndarray:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        x = torch.from_numpy(pixels)
        if not bf16:
            return clip.encode_images(x)
        # What ModelSpec(precision="bf16") does: autocast, so matmuls run in bfloat16.
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            feats = clip.model.encode_image(x)
        v = feats.float().numpy()
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    return encode


class SplitEncoder:
    """Two single-thread ONNX Runtime sessions, each embedding half of every batch at the same
    time: two independent streams, instead of one stream whose two threads wait for each other
    after every op. ONNX Runtime releases the GIL while it runs, so Python threads suffice."""

    def __init__(self, path: Path) -> None:
        self.first = OnnxImageEncoder(path, options=session_options(1))
        self.second = OnnxImageEncoder(path, options=session_options(1))
        self.pool = ThreadPoolExecutor(max_workers=1)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        half = (len(pixels) + 1) // 2
        later = self.pool.submit(self.second.encode, pixels[half:])
        return np.concatenate([self.first.encode(pixels[:half]), later.result()])


def compiled_row(
    args: argparse.Namespace, pixels: np.ndarray, ref: np.ndarray, workdir: Path, batch: int
) -> Row:
    """torch.compile in a child process: compiling can take minutes or hang, and only a child
    can be stopped at a deadline."""
    row = Row("torch.compile fp32 (inductor)", batch, args.threads)
    job = workdir / "compile"
    job.mkdir(exist_ok=True)
    np.save(job / "pixels.npy", pixels)
    spec = {"arch": args.arch, "pretrained": args.pretrained, "batch": batch, "threads": args.threads}
    (job / "spec.json").write_text(json.dumps(spec))
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--compile-worker", str(job)],
            capture_output=True,
            text=True,
            timeout=args.compile_timeout,
        )
    except subprocess.TimeoutExpired:
        row.note = f"skipped: not done within --compile-timeout {args.compile_timeout:.0f}s"
        return row
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        row.note = f"skipped: failed ({last[:120]})"
        return row
    result = json.loads((job / "timing.json").read_text())
    row.timing = Timing(batch, [Sample(**b) for b in result["batches"]])
    row.fid = fidelity(np.load(job / "emb.npy"), ref)
    row.note = f"compile + first batch {result['compile_s']:.0f}s"
    return row


def compile_worker(job: Path) -> None:
    import torch

    spec = json.loads((job / "spec.json").read_text())
    torch.set_num_threads(spec["threads"])
    clip = ClipModel(
        ModelSpec(spec["arch"], spec["pretrained"], device="cpu", precision="fp32", backend="torch")
    )
    pixels = np.load(job / "pixels.npy")
    batch = spec["batch"]
    fn = torch.compile(clip.model.encode_image, dynamic=False)

    def encode(x: np.ndarray) -> np.ndarray:
        n = len(x)
        if n < batch:  # pad: a new shape would mean compiling again
            x = np.concatenate([x, np.zeros((batch - n, *x.shape[1:]), x.dtype)])
        with torch.inference_mode():
            v = fn(torch.from_numpy(x))[:n].float().numpy()
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    t0 = time.perf_counter()
    encode(pixels[:batch])
    compile_s = time.perf_counter() - t0
    emb, timing = run_pass(encode, pixels, batch, warmup=False)
    np.save(job / "emb.npy", emb)
    result = {"batches": [asdict(b) for b in timing.samples], "compile_s": compile_s}
    (job / "timing.json").write_text(json.dumps(result))


def quantize(fp32_path: Path, out: Path, weights: str, reduce_range: bool) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    weight_type = QuantType.QUInt8 if weights == "u8" else QuantType.QInt8
    quantize_dynamic(str(fp32_path), str(out), weight_type=weight_type, reduce_range=reduce_range)
    return out


# ---------------------------------------------------------------- decoding


@dataclass
class DecodeResult:
    label: str
    decode_ms: float
    preprocess_ms: float
    reduced: int = 0  # images that were actually decoded at a reduced scale
    max_abs_diff: float = 0.0
    fid: Fidelity | None = None

    @property
    def total_ms(self) -> float:
        return self.decode_ms + self.preprocess_ms


def measure_decoding(
    blobs: Sequence[bytes], clip: ClipModel, drafts: Sequence[int | None]
) -> tuple[np.ndarray, dict[int | None, np.ndarray], list[DecodeResult]]:
    """Per-image decode and preprocess time on one thread (a decode worker), for each draft
    size, interleaved per image so that machine noise hits all variants alike."""
    import torch

    times = {d: [0.0, 0.0] for d in drafts}
    tensors: dict[int | None, list[np.ndarray]] = {d: [] for d in drafts}
    reduced = dict.fromkeys(drafts, 0)
    full_size: list[tuple[int, int]] = []
    with torch_threads(1), torch.inference_mode():
        for blob in blobs:
            for d in drafts:
                t0 = time.perf_counter()
                img = load_image(blob, draft_size=d).image
                t1 = time.perf_counter()
                x = clip.preprocess(img).numpy()
                t2 = time.perf_counter()
                times[d][0] += t1 - t0
                times[d][1] += t2 - t1
                tensors[d].append(x)
                if d is None:
                    full_size.append(img.size)
                elif img.size != full_size[-1]:
                    reduced[d] += 1
    n = len(blobs)
    stacked = {d: np.stack(v) for d, v in tensors.items()}
    results = [
        DecodeResult(
            "full decode" if d is None else f"draft_size={d}",
            1000 * times[d][0] / n,
            1000 * times[d][1] / n,
            reduced[d],
        )
        for d in drafts
    ]
    return stacked[None], stacked, results


def draft_fidelity(
    clip: ClipModel,
    threads: int,
    pixels: np.ndarray,
    ref: np.ndarray,
    by_draft: dict[int | None, np.ndarray],
    results: Sequence[DecodeResult],
) -> None:
    """How far draft decoding moves the tensors and embeddings. Only images whose tensor changed
    are embedded again; the others' embeddings are the reference's by construction."""
    n = len(pixels)
    for res, d in zip(results, by_draft, strict=True):
        if d is None:
            continue
        diff = np.abs(by_draft[d] - pixels).reshape(n, -1).max(axis=1)
        res.max_abs_diff = float(diff.max())
        changed = np.flatnonzero(diff > 0)
        emb = ref.copy()
        if len(changed):
            emb[changed] = torch_encoder(clip, threads)(by_draft[d][changed])
        res.fid = fidelity(emb, ref)


# ---------------------------------------------------------------- decoding beside inference


class DecodeLoop(threading.Thread):
    """Decodes (draft 224) and preprocesses JPEGs round and round until stopped, as an
    indexer's decode worker would; PIL releases the GIL while decoding and resizing.

    With `out`, it hands over batches through that bounded queue and waits when the queue is
    full (a real pipeline); without, it decodes nonstop and throws the result away (worst case).
    """

    def __init__(
        self, blobs: Sequence[bytes], clip: ClipModel, batch: int = 0, out: queue.Queue | None = None
    ) -> None:
        super().__init__(daemon=True)
        self.blobs, self.clip, self.batch, self.out = blobs, clip, batch, out
        self.decoded = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        import torch

        pending: list[np.ndarray] = []
        with torch.inference_mode():
            while not self.stopping.is_set():
                for blob in self.blobs:
                    if self.stopping.is_set():
                        return
                    pending.append(self.clip.preprocess(load_image(blob, draft_size=224).image).numpy())
                    self.decoded += 1
                    if self.out is None:
                        pending.clear()
                    elif len(pending) == self.batch:
                        self._put(np.stack(pending))
                        pending = []

    def _put(self, item: np.ndarray) -> None:
        assert self.out is not None
        while not self.stopping.is_set():
            try:
                self.out.put(item, timeout=0.1)
                return
            except queue.Full:
                continue


@dataclass
class Phase:
    timing: Timing
    decoded: int = 0
    seconds: float = 0.0

    @property
    def decode_rate(self) -> float | None:
        return self.decoded / self.seconds if self.seconds else None


PHASES = ("alone", "decoder nonstop", "pipelined")


def concurrency(
    encode: Encoder,
    pixels: np.ndarray,
    blobs: Sequence[bytes],
    clip: ClipModel,
    batch: int,
    seconds: float,
    rounds: int,
    quiet_wait: float,
) -> dict[str, Phase]:
    """Model throughput alone, beside a thread decoding JPEGs nonstop, and fed by a decoding
    thread through a 2-batch queue (batch time includes waiting for the queue), alternating
    phases so that changes in machine load hit all alike."""
    phases = {name: Phase(Timing(batch)) for name in PHASES}
    encode(pixels[:batch])
    for _ in range(rounds):
        for name, phase in phases.items():
            wait_until_quiet(quiet_wait)
            feed: queue.Queue[np.ndarray] = queue.Queue(maxsize=2)
            worker = None
            if name == "decoder nonstop":
                worker = DecodeLoop(blobs, clip)
            elif name == "pipelined":
                worker = DecodeLoop(blobs, clip, batch, feed)
            if worker:
                worker.start()
                time.sleep(0.5)  # past its start-up
            d0 = worker.decoded if worker else 0
            start = time.perf_counter()
            while time.perf_counter() - start < seconds or len(phase.timing.samples) < 2:
                with measure() as s:
                    encode(feed.get() if name == "pipelined" else pixels[:batch])
                phase.timing.samples.append(s)
            if worker:
                phase.decoded += worker.decoded - d0
                phase.seconds += time.perf_counter() - start
                worker.stopping.set()
                worker.join()
    return phases


def model_options(
    args: argparse.Namespace,
    clip: ClipModel,
    enc: OnnxImageEncoder,
    pixels: np.ndarray,
    workdir: Path,
    batches: Sequence[int],
    mid: int,
) -> tuple[list[Row], np.ndarray]:
    """Every option on the same preprocessed tensors; torch fp32 at the first batch size is the
    reference embedding the others are compared with."""
    n = len(pixels)
    rows: list[Row] = []
    # -- torch float32: the reference
    ref: np.ndarray | None = None
    for b in batches:
        wait_until_quiet(args.quiet_wait)
        enc_t = torch_encoder(clip, args.threads)
        emb, timing = run_pass(enc_t, pixels, b)
        if ref is None:
            ref = emb
        note = "reference" if b == batches[0] else f"vs batch {batches[0]}"
        rows.append(Row("torch fp32 (eager)", b, args.threads, enc_t, timing, fidelity(emb, ref), note))
        print_progress(rows[-1])
    assert ref is not None
    wait_until_quiet(args.quiet_wait)
    enc_t = torch_encoder(clip, 1)
    emb, timing = run_pass(enc_t, pixels, mid)
    rows.append(Row("torch fp32 (eager), set_num_threads(1)", mid, 1, enc_t, timing, fidelity(emb, ref)))
    print_progress(rows[-1])

    # bf16 is emulated on CPUs without avx512_bf16/AMX: far too slow to re-time in the rounds.
    k = min(args.bf16_limit, n)
    bb = min(16, k)
    wait_until_quiet(args.quiet_wait)
    emb, timing = run_pass(torch_encoder(clip, args.threads, bf16=True), pixels[:k], bb)
    rows.append(
        Row(
            "torch bf16 autocast",
            bb,
            args.threads,
            None,
            timing,
            fidelity(emb, ref[:k]),
            f"first {k} images",
        )
    )
    print_progress(rows[-1])

    if args.compile_timeout > 0:
        wait_until_quiet(args.quiet_wait)
        rows.append(compiled_row(args, pixels, ref, workdir, mid))
    else:
        rows.append(
            Row("torch.compile fp32 (inductor)", mid, args.threads, note="skipped (--compile-timeout 0)")
        )
    print_progress(rows[-1])

    # -- ONNX Runtime
    for b in batches:
        wait_until_quiet(args.quiet_wait)
        emb, timing = run_pass(enc.encode, pixels, b)
        name = "ORT fp32 (OnnxImageEncoder defaults)"
        rows.append(Row(name, b, args.threads, enc.encode, timing, fidelity(emb, ref)))
        print_progress(rows[-1])

    kv = min(args.variant_limit, n)
    variants: list[tuple[str, int, dict[str, Any]]] = [
        ("ORT fp32 variant: ENABLE_BASIC", args.threads, {"level": "basic"}),
        ("ORT fp32 variant: ENABLE_EXTENDED", args.threads, {"level": "extended"}),
        ("ORT fp32 variant: ENABLE_ALL, parallel", args.threads, {"level": "all", "parallel": True}),
        ("ORT fp32 variant: ENABLE_ALL, no spinning", args.threads, {"level": "all", "spinning": False}),
        ("ORT fp32 variant: ENABLE_ALL, 1 thread", 1, {"level": "all"}),
    ]
    for name, threads, kw in variants:
        venc = OnnxImageEncoder(enc.path, options=session_options(threads, **kw))
        wait_until_quiet(args.quiet_wait)
        emb, timing = run_pass(venc.encode, pixels[:kv], mid)
        rows.append(
            Row(name, mid, threads, venc.encode, timing, fidelity(emb, ref[:kv]), f"first {kv} images")
        )
        print_progress(rows[-1])

    split = SplitEncoder(enc.path)
    wait_until_quiet(args.quiet_wait)
    emb, timing = run_pass(split, pixels, mid)
    name = "ORT fp32: 2 sessions x 1 thread, batch split"
    rows.append(Row(name, mid, 2, split, timing, fidelity(emb, ref), f"{mid // 2} images per session"))
    print_progress(rows[-1])

    # Dynamic int8: weights quantised offline, activations per batch at run time. On AVX2
    # without VNNI, u8 activations x s8 weights go through 16-bit intermediate sums that can
    # saturate; u8 x u8 and 7-bit (reduce_range) s8 weights avoid that.
    for weights, reduce_range in (("u8", False), ("s8", False), ("s8", True)):
        name = f"ORT int8 dynamic ({weights} weights{', reduce_range' if reduce_range else ''})"
        qpath = quantize(
            enc.path, workdir / f"int8-{weights}-{int(reduce_range)}.onnx", weights, reduce_range
        )
        qenc = OnnxImageEncoder(qpath, threads=args.threads)
        wait_until_quiet(args.quiet_wait)
        emb, timing = run_pass(qenc.encode, pixels, mid)
        fid = fidelity(emb, ref)
        # Speed is kept only for a faithful variant: an unfaithful one is no option at all.
        if fid.passes:
            rows.append(Row(name, mid, args.threads, qenc.encode, timing, fid))
        else:
            rows.append(Row(name, mid, args.threads, None, None, fid, "speed not measured"))
        print_progress(rows[-1])

    if args.rounds:
        extra_rounds(rows, pixels, args.rounds, args.round_images, min(args.quiet_wait, 10))
    return rows, ref


# ---------------------------------------------------------------- precision suite (issue 10)
#
# Cheaper arithmetic on CPUs with native bfloat16 (avx512_bf16, AMX) and int8 (VNNI, AMX): which
# options are faster than today's default (ONNX Runtime float32) and which keep the embeddings
# faithful. Every option embeds the same images once at the middle batch size (fidelity), then all
# (option, batch) pairs are timed round-robin, so that load from other users hits them alike.


def ort_int8(fp32_path: Path, out: Path, scope: str) -> Path:
    """Dynamic int8 (weights per output channel, activations quantised per batch at run time) of
    the MatMuls with a weight: scope "mlp" quantises only the MLP layers (two thirds of the
    arithmetic; the attention projections stay float32), "matmul" every weight MatMul."""
    import shutil

    from retrieval.embedding.int8 import quantize_image_tower

    # The library's own quantisation (what --precision int8 runs), on a copy in the work folder.
    src = out.with_name(f"fp32-for-{out.name}")
    shutil.copyfile(fp32_path, src)
    return quantize_image_tower(src, mlp_only=scope == "mlp")


def nncf_encoder(model: Any, threads: int) -> Encoder:
    """OpenVINO on the CPU running an NNCF-quantised openvino.Model; its remaining float ops run
    in OpenVINO's default precision (bf16 where the CPU has AMX or avx512_bf16)."""
    import openvino as ov

    config: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    request = ov.Core().compile_model(model, "CPU", config).create_infer_request()

    def encode(pixels: np.ndarray) -> np.ndarray:
        v = request.infer({0: np.ascontiguousarray(pixels, np.float32)})[0].astype(np.float32)
        return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)

    return encode


def nncf_int8(fp32_path: Path, calibration: np.ndarray) -> Any:
    """Static int8 by NNCF (post-training, transformer preset), calibrated on images that are
    not among the evaluated ones."""
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(fp32_path))
    data = nncf.Dataset([calibration[i : i + 1] for i in range(len(calibration))])
    return nncf.quantize(model, data, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calibration))


def torch_bf16_weights_encoder(clip: ClipModel, threads: int) -> Encoder:
    """The whole image tower converted to bfloat16 (no autocast): no per-op casts, half the
    weight memory traffic."""
    import copy

    import torch

    visual = copy.deepcopy(clip.model.visual).to(torch.bfloat16).eval()

    def encode(pixels: np.ndarray) -> np.ndarray:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        with torch.inference_mode():
            v = visual(torch.from_numpy(pixels).to(torch.bfloat16)).float().numpy()
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    return encode


# Far slower than the others where measured (autocast's bf16 CPU kernels): not worth re-timing.
SLOW = frozenset({"torch bf16 autocast (eager)"})


def precision_factories(
    args: argparse.Namespace, clip: ClipModel, onnx_path: Path, workdir: Path, calibration: np.ndarray
) -> list[tuple[str, Callable[[], Encoder]]]:
    """(name, make the encoder): made one at a time, so that a failing option is only skipped."""
    t = args.threads
    options: list[tuple[str, Callable[[], Encoder]]] = [
        (
            "ORT fp32 (clipdex CPU default)",
            lambda: OnnxImageEncoder(onnx_path, options=session_options(t, spinning=False)).encode,
        ),
        ("torch fp32 (eager)", lambda: torch_encoder(clip, t)),
        ("torch bf16 autocast (eager)", lambda: torch_encoder(clip, t, bf16=True)),
        ("torch bf16 weights (eager)", lambda: torch_bf16_weights_encoder(clip, t)),
        (
            "ORT int8 dyn, MLP MatMuls, per-channel",
            lambda: (
                OnnxImageEncoder(
                    ort_int8(onnx_path, workdir / "int8-mlp.onnx", "mlp"),
                    options=session_options(t, spinning=False),
                ).encode
            ),
        ),
        (
            "ORT int8 dyn, all weight MatMuls, per-ch",
            lambda: (
                OnnxImageEncoder(
                    ort_int8(onnx_path, workdir / "int8-matmul.onnx", "matmul"),
                    options=session_options(t, spinning=False),
                ).encode
            ),
        ),
    ]
    if importlib.util.find_spec("openvino"):
        options += [
            # What the library's openvino backend runs
            ("OpenVINO fp32", lambda: OpenVinoImageEncoder(onnx_path, "fp32", threads=t).encode),
            ("OpenVINO bf16 hint", lambda: OpenVinoImageEncoder(onnx_path, "bf16", threads=t).encode),
        ]
        if importlib.util.find_spec("nncf") and len(calibration):
            options.append(
                ("OpenVINO int8 (NNCF static)", lambda: nncf_encoder(nncf_int8(onnx_path, calibration), t))
            )
    if args.options:  # a quicker repeat of some options only
        wanted = [w.strip().lower() for w in args.options.split(",")]
        # torch fp32 always: it is the reference
        options = [
            o for o in options if o[0].startswith("torch fp32") or any(w in o[0].lower() for w in wanted)
        ]
    return options


def precision_options(
    args: argparse.Namespace,
    clip: ClipModel,
    onnx_path: Path,
    pixels: np.ndarray,
    calibration: np.ndarray,
    workdir: Path,
    batches: Sequence[int],
    mid: int,
) -> list[Row]:
    """Fidelity of every option against torch fp32 on all images at batch `mid`, then every
    (option, batch) timed round-robin, `args.rounds` rounds of `args.round_images` images."""
    others: list[Row] = []  # skipped options, and slow ones timed in their fidelity pass only
    made: list[tuple[str, Encoder, np.ndarray]] = []
    slow: list[tuple[str, np.ndarray, Timing]] = []
    for name, make in precision_factories(args, clip, onnx_path, workdir, calibration):
        k = min(args.bf16_limit, len(pixels)) if name in SLOW else len(pixels)
        try:
            t0 = time.perf_counter()
            encode = make()
            ready = time.perf_counter() - t0
            wait_until_quiet(args.quiet_wait)
            emb, timing = run_pass(encode, pixels[:k], mid)
        except Exception as exc:  # one option that cannot run must not stop the others
            others.append(Row(name, mid, args.threads, note=f"skipped: {str(exc).splitlines()[0][:100]}"))
            print_progress(others[-1])
            continue
        if name in SLOW:
            slow.append((name, emb, timing))
        else:
            made.append((name, encode, emb))
        print(f"  {name}: made in {ready:.1f}s, {k} images embedded", flush=True)
    ref = next(emb for name, _, emb in made if name.startswith("torch fp32"))
    for name, emb, timing in slow:
        fid = fidelity(emb, ref[: len(emb)])
        others.append(Row(name, mid, args.threads, None, timing, fid, f"first {len(emb)} images"))
    table = {
        (name, b): Row(name, b, args.threads, encode, Timing(b), fidelity(emb, ref))
        for name, encode, emb in made
        for b in batches
    }
    for r in range(args.rounds):
        for b in batches:
            count = max(b, args.round_images // b * b)
            for name, encode, _ in made:
                wait_until_quiet(args.quiet_wait)
                _, timing = run_pass(encode, pixels[:count], b)
                row = table[(name, b)]
                assert row.timing is not None
                row.timing.samples.extend(timing.samples)
        print(f"  round {r + 1}/{args.rounds} done", flush=True)
    return [table[(name, b)] for name, _, _ in made for b in batches] + others


# ---------------------------------------------------------------- report


def _cell(v: float | None, width: int, fmt: str) -> str:
    return ("-" if v is None or v != v else format(v, fmt)).rjust(width)


def print_rows(rows: Sequence[Row]) -> None:
    head = (
        f"{'option':<44} {'batch':>5} {'thr':>3} {'img/s':>6} {'quiet img/s (n)':>15} {'cpu ms/img':>10}"
        f" {'others':>6} {'mean cos':>9} {'min cos':>9} {'knn@10':>6}  verdict / note"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        t, fd = r.timing, r.fid
        verdict = "" if fd is None else ("faithful" if fd.passes else "NOT faithful")
        note = "; ".join(x for x in (verdict, r.note) if x)
        quiet = "-" if t is None else f"{_cell(t.quiet_rate, 0, '.2f')} ({len(t.quiet)}/{len(t.samples)})"
        others = t.total.others_share if t else None
        print(
            f"{r.option:<44} {r.batch:>5} {r.threads:>3} {_cell(t.rate if t else None, 6, '.2f')}"
            f" {quiet:>15} {_cell(t.cpu_ms_per_image if t else None, 10, '.1f')}"
            f" {_cell(100 * others if others is not None else None, 5, '.0f')}%"
            f" {_cell(fd.mean_cos if fd else None, 9, '.6f')} {_cell(fd.min_cos if fd else None, 9, '.6f')}"
            f" {_cell(fd.knn_agreement if fd else None, 6, '.3f')}  {note}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of JPEG photos")
    p.add_argument("--limit", type=int, default=256, help="images to use (first N by name)")
    p.add_argument(
        "--suite",
        choices=("full", "precision"),
        default="full",
        help="full: every option, decoding, concurrency; precision: fp32 vs bf16, int8, OpenVINO only",
    )
    p.add_argument("--arch", "--model", dest="arch", default="ViT-B-32")
    p.add_argument("--pretrained", default="random", help="tag or checkpoint; 'random' is seeded")
    p.add_argument("--threads", type=int, default=2, help="threads for inference")
    p.add_argument("--batches", help="batch sizes (default: 16,32,64; precision suite: 8,16,32)")
    p.add_argument("--options", help="precision suite: only options whose names contain one of these (a,b)")
    p.add_argument("--calib", type=int, default=64, help="NNCF calibration images (after the --limit ones)")
    p.add_argument("--bf16-limit", type=int, default=32, help="images for bf16 (slow without native bf16)")
    p.add_argument("--variant-limit", type=int, default=64, help="images for each ORT session-option variant")
    p.add_argument("--compile-timeout", type=float, default=900, help="seconds; 0 skips torch.compile")
    p.add_argument("--concurrency-seconds", type=float, default=20, help="per phase; 0 skips")
    p.add_argument("--rounds", type=int, default=3, help="extra round-robin timing rounds of all options")
    p.add_argument("--round-images", type=int, default=64, help="images per option per extra round")
    p.add_argument("--quiet-wait", type=float, default=30, help="max s to wait for a quiet machine per row")
    p.add_argument("--skip-model", action="store_true", help="only decoding and the concurrency test")
    p.add_argument("--json", type=Path, help="also write all results here")
    p.add_argument("--compile-worker", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.compile_worker:
        compile_worker(args.compile_worker)
        return 0

    import onnxruntime as ort
    import torch

    every = sorted(f for f in args.data.glob("*") if f.suffix.lower() in (".jpg", ".jpeg"))
    files = every[: args.limit]
    if not files:
        print(f"no JPEG files in {args.data} (pass --data DIR)", file=sys.stderr)
        return 2
    if args.suite == "precision":
        return precision_main(args, files, every[args.limit : args.limit + args.calib])
    batches = [int(b) for b in (args.batches or "16,32,64").split(",")]
    mid = 32 if 32 in batches else batches[0]
    torch.set_num_threads(args.threads)
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(
        f"machine: {cpu_name()}, {NCPU} CPUs, torch {torch.__version__} "
        f"({torch.backends.cpu.get_cpu_capability()}), onnxruntime {ort.__version__}, "
        f"python {platform.python_version()}"
    )
    blobs = [f.read_bytes() for f in files]  # from memory: measure decoding, not the disk
    print(f"data: {len(files)} JPEGs from {args.data}; model {args.arch} / {args.pretrained}\n", flush=True)

    # backend="torch": ClipModel would otherwise pick ONNX Runtime on the CPU, and torch is the reference.
    clip = ClipModel(ModelSpec(args.arch, args.pretrained, device="cpu", precision="fp32", backend="torch"))
    assert clip.backend == "torch", clip.backend
    report: dict[str, Any] = {"command": sys.argv, "machine": cpu_name(), "cpus": NCPU}

    # -- decoding first: it yields the preprocessed tensors every model option then shares
    drafts: list[int | None] = [None, 224, 448]
    pixels, by_draft, decode_results = measure_decoding(blobs, clip, drafts)
    n = len(pixels)

    with tempfile.TemporaryDirectory(prefix="clipdex-bench-") as tmp:
        workdir = Path(tmp)

        onnx_path = workdir / "vision.onnx"
        t0 = time.perf_counter()
        export_image_tower(clip.model, onnx_path, int(pixels.shape[-1]))
        report["onnx_export_s"] = time.perf_counter() - t0
        enc = OnnxImageEncoder(onnx_path, threads=args.threads)
        rows: list[Row] = []
        if not args.skip_model:
            rows, ref = model_options(args, clip, enc, pixels, workdir, batches, mid)
            draft_fidelity(clip, args.threads, pixels, ref, by_draft, decode_results)

        # -- decoding beside inference, with both fp32 backends
        conc: dict[str, dict[str, Phase]] = {}
        if args.concurrency_seconds > 0:
            nospin = OnnxImageEncoder(onnx_path, options=session_options(args.threads, spinning=False))
            backends: list[tuple[str, Encoder]] = [
                ("ORT fp32", enc.encode),
                ("ORT no spin", nospin.encode),
                ("ORT 2x1 split", SplitEncoder(onnx_path)),
                ("torch fp32", torch_encoder(clip, args.threads)),
            ]
            for label, fn in backends:
                conc[label] = concurrency(
                    fn, pixels, blobs, clip, mid, args.concurrency_seconds, 2, min(args.quiet_wait, 10)
                )

    print("\n== Model alone, on preprocessed tensors (images/s of the median full batch) ==")
    print(
        f"fidelity vs torch fp32: faithful = mean cos >= {MEAN_COS_REQUIRED}, min cos >= {MIN_COS_REQUIRED}"
    )
    print_rows(rows)

    print("\n== Decoding + preprocessing, per image on one thread (bytes already in memory) ==")
    print(
        f"{'decode':<18} {'decode ms':>9} {'preproc ms':>10} {'total ms':>8} {'img/s':>6} {'reduced':>7}"
        f" {'max|dx|':>8} {'mean cos':>9} {'min cos':>9}"
    )
    for r in decode_results:
        fd = r.fid
        print(
            f"{r.label:<18} {r.decode_ms:>9.2f} {r.preprocess_ms:>10.2f} {r.total_ms:>8.2f}"
            f" {1000 / r.total_ms:>6.1f} {r.reduced:>3}/{n:<3} {r.max_abs_diff:>8.4f}"
            f" {_cell(fd.mean_cos if fd else None, 9, '.6f')} {_cell(fd.min_cos if fd else None, 9, '.6f')}"
        )

    if conc:
        print(f"\n== Inference (batch {mid}, {args.threads} threads) alone and beside 1 decoding thread ==")
        print(
            f"{'backend':<12} {'phase':<16} {'model img/s':>11} {'quiet img/s (n)':>15} {'cpu ms/img':>10}"
            f" {'decoded img/s':>13} {'others':>6}"
        )
        for label, phases in conc.items():
            for name, ph in phases.items():
                t = ph.timing
                others = t.total.others_share
                quiet = f"{_cell(t.quiet_rate, 0, '.2f')} ({len(t.quiet)}/{len(t.samples)})"
                print(
                    f"{label:<12} {name:<16} {t.rate:>11.2f} {quiet:>15} {t.cpu_ms_per_image:>10.1f}"
                    f" {_cell(ph.decode_rate, 13, '.1f')}"
                    f" {_cell(100 * others if others is not None else None, 5, '.0f')}%"
                )
        print(
            "decoder nonstop: a thread decodes+preprocesses JPEGs as fast as it can, results dropped;\n"
            "pipelined: that thread feeds the model through a 2-batch queue (batch time includes waiting);\n"
            "cpu ms/img includes the decoding thread's CPU time"
        )

    if args.json:
        report["rows"] = [r.to_dict() for r in rows]
        report["decode"] = [
            {**asdict(r), "total_ms": r.total_ms, "fid": asdict(r.fid) if r.fid else None}
            for r in decode_results
        ]
        report["concurrency"] = {
            label: {
                name: {**ph.timing.summary(), "decode_rate": ph.decode_rate} for name, ph in phases.items()
            }
            for label, phases in conc.items()
        }
        args.json.write_text(json.dumps(report, indent=1))
    return 0


def precision_main(args: argparse.Namespace, files: Sequence[Path], calib_files: Sequence[Path]) -> int:
    """--suite precision: the model alone in each precision / backend, fidelity vs torch fp32."""
    import onnxruntime as ort
    import torch

    batches = [int(b) for b in (args.batches or "8,16,32").split(",")]
    mid = 16 if 16 in batches else batches[0]
    torch.set_num_threads(args.threads)
    versions = [f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()})"]
    versions.append(f"onnxruntime {ort.__version__}")
    if importlib.util.find_spec("openvino"):
        import openvino as ov

        versions.append(f"openvino {ov.get_version()}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"machine: {cpu_name()}, {NCPU} CPUs, flags: {' '.join(flags_of_interest()) or 'none of interest'}")
    print(f"software: {', '.join(versions)}")
    clip = ClipModel(ModelSpec(args.arch, args.pretrained, device="cpu", precision="fp32", backend="torch"))
    with torch_threads(1), torch.inference_mode():
        pixels = np.stack([clip.preprocess(load_image(f).image).numpy() for f in files])
        calibration = (
            np.stack([clip.preprocess(load_image(f).image).numpy() for f in calib_files])
            if (calib_files)
            else np.empty((0, *pixels.shape[1:]), np.float32)
        )
    print(
        f"data: {len(files)} images (+{len(calibration)} for calibration) from {args.data}; "
        f"model {args.arch} / {args.pretrained}\n",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="clipdex-bench-") as tmp:
        workdir = Path(tmp)
        onnx_path = export_image_tower(clip.model, workdir / "vision.onnx", int(pixels.shape[-1]))
        rows = precision_options(args, clip, onnx_path, pixels, calibration, workdir, batches, mid)
    print(f"\n== Model alone, {args.threads} threads (images/s of the median full batch; preliminary) ==")
    print(
        f"fidelity vs torch fp32 on all {len(pixels)} images at batch {mid}: "
        f"faithful = mean cos >= {MEAN_COS_REQUIRED}, min cos >= {MIN_COS_REQUIRED}"
    )
    print_rows(rows)
    if args.json:
        report = {"command": sys.argv, "machine": cpu_name(), "flags": flags_of_interest(), "cpus": NCPU}
        report["rows"] = [r.to_dict() for r in rows]
        args.json.write_text(json.dumps(report, indent=1))
    return 0


def print_progress(row: Row) -> None:
    t = row.timing
    rate = f"{t.rate:.2f} img/s" if t else "-"
    fid = f", min cos {row.fid.min_cos:.6f}" if row.fid else ""
    print(f"  {row.option} b{row.batch} t{row.threads}: {rate}{fid} {row.note}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
