"""Which vector index an index directory gets, by rules on its size and a memory budget.

One small function per decision, so that each can be read (and tested) on its own:

- below `EXACT_BELOW` vectors: exact flat search. A flat scan of 50k x 512 floats takes a few
  ms on one core, exact answers cost nothing there, and small libraries keep today's results;
- above: an inverted file (IVF) whose lists hold compressed codes, SQ8 while the codes fit the
  budget comfortably, else product quantization (PQ); from HNSW_QUANTIZER_FROM lists on, the
  lists to scan are found through an HNSW graph of their centroids (`coarse_quantizer`). The
  codes only choose candidates: the top `rerank_depth(k)` candidates are scored again exactly
  from the catalog's stored vectors, so the codes' error costs recall only where a true
  neighbour falls out of the candidate list;
- `nprobe` (lists scanned per query) is not guessed but measured: the smallest power of two,
  refined between the last two tried, whose recall@10 after re-ranking reaches the target;
- so is the re-ranking depth, with it (`pick_search`): each candidate re-ranked is a random read
  of the catalog (~5-12 us), the largest cost of a warm search at 1M once codes are accurate.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass

from retrieval.core.errors import ClipdexError

EXACT_BELOW = 50_000  # vectors; below it a flat scan is fast enough and exact
DEFAULT_MAX_MEMORY = 512 * 2**20  # the ANN index in a query process (the target: RSS < 1 GB)
DEFAULT_TARGET_RECALL = 0.95
ID_BYTES = 8  # each IVF entry stores its int64 id beside its code
MIN_NLIST, MAX_NLIST = 256, 16_384
MIN_POINTS_PER_LIST = 39  # FAISS's own floor for k-means: fewer points per centroid train badly
TRAIN_POINTS_PER_LIST = 32  # k-means on 32 points a centroid is within noise of 256 (FAISS's cap)
MAX_TRAIN = 200_000  # bounds training time on 2 cores (k-means cost ~ train x nlist x d)
# From this many lists, the centroids nearest a query are found through an HNSW graph over them
# (M = HNSW_M links a node) instead of a flat scan: at 1M x 512, 4096 centroids are 8 MB read per
# query, 0.4-0.5 ms of a 0.7 ms search with one thread; HNSW at efSearch 32 takes ~0.05 ms, and
# recall@10 after re-ranking was unchanged (0.9715 at nprobe 7, depth 33; efSearch 16: 0.9665).
# The graph finds the nearest lists, not all of them: past HNSW_MAX_NPROBE lists (filtered
# searches scan up to every list) they are found exactly, from the graph's own flat storage.
HNSW_QUANTIZER_FROM = 1024
HNSW_M = 32
HNSW_MIN_EF = 32
HNSW_MAX_NPROBE = 64
MIN_RERANK = 100
RERANK_FACTOR = 4
RECALL_K = 10  # the k recall is measured at (optimize)
# Re-ranking depths tried by optimize, as multiples of k (k = 10: 20 .. 100 candidates read from
# the catalog). The last one is the unmeasured default's depth at k = 10 (rerank_depth). Measured
# at 1M structured x 512, IVF4096, nprobe 7, recall@10 at depth 20/30/40/100: PQ64 0.72 / 0.82 /
# 0.86 / 0.97; PQ128 0.92 / 0.96 / 0.98 / 0.99 (read cost ~12 us a candidate, 32 KB pages).
RERANK_FACTORS = (2, 3, 4, 6, MIN_RERANK // RECALL_K)
# The cost model that trades lists scanned against candidates re-ranked (pick_search), from the
# same measurements: a code scanned ~0.06 us (IVF4096,PQ128 at 1M: +14 us a list of ~250), a
# candidate read from the catalog ~12 us. For nprobe, a cap of NPROBE_SPAN times the nprobe the
# deepest re-ranking needs bounds both the search and the time measuring it.
SCAN_US_PER_CODE = 0.06
READ_US_PER_CANDIDATE = 12.0
NPROBE_SPAN = 8
# A filter matching at most this many images is scored exactly from the catalog (all of them:
# an exact answer) instead of through the ANN index with an ID selector. Measured at 200k x 512
# (IVF2048,SQ8, nprobe 1; 2 loaded cores), p50 of a filtered top-10, exact scan / ID selector:
# 100 allowed 4.5 / 6.3 ms, 300 8.5 / 7.1 ms, 1000 65 / 8.8 ms, 10000 207 / 3.6 ms. Since nprobe
# grows as 1/selectivity (filtered_nprobe), a rare filter scans every list: re-measured (CPU
# time, random allowed ids, exact / selector), 100k IVF2048,SQ8: 256 1.5 / 2.4 ms, 512 3.2 / 1.8;
# 1M IVF4096,PQ64: 256 1.4 / 14.9, 1024 5.2 / 11.3 (PQ computes a table per list scanned, ~2.4 us:
# there the crossover is nearer 2000). Reading a vector from SQLite: ~5 us.
SMALL_FILTER = 256  # SQ8 codes (exact_filter_limit)
SMALL_FILTER_PQ = 1024  # PQ codes
# A filtered ANN search lists the matching ids (Catalog.select_ids, ~0.8 us an id) when they are
# few, else checks the candidates of an unfiltered search against the filter (Catalog.filter_ids,
# ~4 us a candidate, 1.25 * depth / share of them). The two costs cross where the filter's share
# of the images is about sqrt(LIST_CROSSOVER / n) (list_share_below): 7.7% at 100k, 2.4% at 1M.
# Measured (structured 512-d sets, rank() p50, list / candidates): 100k IVF2048,SQ8: 2% 7 / 20 ms,
# 5% 13 / 13, 10% 25 / 12; 1M IVF4096,PQ64: 2% 35 / 46, 5% 84 / 24, 10% 176 / 18, 50% 438 / 7.
# - POST_FILTER_PRIOR: the share the first candidate check assumes; its candidates then tell
#   the filter's share near the query, and a share under the crossover lists the matches.
# - POST_FILTER_MARGIN: extra candidates, so that ~depth of them match.
LIST_CROSSOVER = 600
POST_FILTER_PRIOR = 0.5
POST_FILTER_MARGIN = 1.25


@dataclass(frozen=True)
class IndexPlan:
    """What to build: `factory` is a `faiss.index_factory` string ("Flat" for exact search)."""

    kind: str  # "flat" or "ivf"
    factory: str
    vectors: int
    dim: int
    nlist: int = 0
    codes: str = "flat"  # "flat", "SQ8" or "PQ<m>"
    train_size: int = 0
    index_bytes: int = 0  # estimated memory of the index in a query process
    reason: str = ""

    @property
    def approximate(self) -> bool:
        return self.kind == "ivf"

    def to_dict(self) -> dict:
        return asdict(self)


def choose_plan(
    n: int, dim: int, *, max_memory: int = DEFAULT_MAX_MEMORY, exact_below: int = EXACT_BELOW
) -> IndexPlan:
    """The index for `n` vectors of dimension `dim` within `max_memory` bytes."""
    if n < exact_below:
        return IndexPlan(
            "flat",
            "Flat",
            n,
            dim,
            index_bytes=flat_bytes(n, dim),
            reason=f"{n} vectors < {exact_below}: exact search",
        )
    nlist = choose_nlist(n)
    codes = choose_codes(n, dim, nlist, max_memory)
    return IndexPlan(
        "ivf",
        f"IVF{nlist}{coarse_quantizer(nlist)},{codes}",
        n,
        dim,
        nlist=nlist,
        codes=codes,
        train_size=train_size(n, nlist),
        index_bytes=ivf_bytes(n, dim, nlist, code_bytes(codes, dim)),
        reason=f"{n} vectors >= {exact_below}: IVF with {codes} codes within {human(max_memory)}",
    )


def choose_nlist(n: int) -> int:
    """The number of inverted lists: the power of two at or above 4*sqrt(n), so between 4 and 8
    sqrt(n) (the usual range: lists of ~sqrt(n)/8 vectors, a coarse quantizer that costs about as
    much to search as the lists it selects), clamped, and never so many that k-means would get
    fewer than MIN_POINTS_PER_LIST training points each."""
    nlist = 2 ** math.ceil(math.log2(max(1.0, 4.0 * math.sqrt(n))))
    nlist = min(max(nlist, MIN_NLIST), MAX_NLIST)
    while nlist > 1 and nlist * MIN_POINTS_PER_LIST > n:
        nlist //= 2
    return nlist


def coarse_quantizer(nlist: int) -> str:
    """The factory suffix of the coarse quantizer: '' (flat) or '_HNSW32' from
    HNSW_QUANTIZER_FROM lists on (its graph: ~nlist x 2M x 4 bytes, 1 MB at 4096 lists)."""
    return f"_HNSW{HNSW_M}" if nlist >= HNSW_QUANTIZER_FROM else ""


def quantizer_ef(nprobe: int) -> int:
    """HNSW's efSearch for `nprobe` lists: twice the lists wanted, HNSW_MIN_EF at least."""
    return max(HNSW_MIN_EF, 2 * nprobe)


def choose_codes(n: int, dim: int, nlist: int, max_memory: int) -> str:
    """SQ8 (one byte a dimension, nearly exact) while its codes take at most half the budget:
    near-exact candidates keep nprobe low and the headroom absorbs later adds. Otherwise PQ with
    m = dim/4 sub-quantizers (4 dimensions a byte), halved while it does not fit, down to dim/32;
    below that the budget cannot hold the index and the caller is told how much it needs.

    dim/4 first, not the usual dim/8: the exact re-ranking reads every candidate from the catalog,
    and coarser codes need more candidates for the same recall (1M x 512 structured: PQ64 needs
    100 for recall@10 0.97, PQ128 40 for 0.98; see RERANK_FACTORS), while the codes' memory
    (136 MB against 72 MB at 1M) and scan time (~0.6 ms either way at nprobe 7) barely differ."""
    if ivf_bytes(n, dim, nlist, dim) <= max_memory // 2:
        return "SQ8"
    for m in pq_choices(dim):
        if ivf_bytes(n, dim, nlist, m) <= max_memory:
            return f"PQ{m}"
    smallest = pq_choices(dim)[-1] if pq_choices(dim) else dim
    need = ivf_bytes(n, dim, nlist, smallest)
    raise ClipdexError(
        f"--max-memory {human(max_memory)} cannot hold an index of {n} vectors: "
        f"it needs at least {human(need)}"
    )


def pq_choices(dim: int) -> list[int]:
    """PQ sub-quantizer counts to try, most accurate first: dim/4 .. dim/32 (those dividing dim)."""
    out = [dim // div for div in (4, 8, 16, 32) if dim % div == 0 and dim // div >= 1]
    return out or [1]


def code_bytes(codes: str, dim: int) -> int:
    if codes == "SQ8":
        return dim
    if codes.startswith("PQ"):
        return int(codes[2:])
    return 4 * dim


def ivf_bytes(n: int, dim: int, nlist: int, per_code: int) -> int:
    """Codes and ids in the lists plus the coarse centroids (float32)."""
    return n * (per_code + ID_BYTES) + nlist * dim * 4


def flat_bytes(n: int, dim: int) -> int:
    return n * (4 * dim + ID_BYTES)


def train_size(n: int, nlist: int) -> int:
    """Vectors sampled to train the coarse quantizer and the codes."""
    return min(n, max(nlist * TRAIN_POINTS_PER_LIST, 10_000), MAX_TRAIN)


def rerank_depth(k: int, factor: int | None = None) -> int:
    """Candidates scored exactly for a top-k: enough that a neighbour the codes rank a little too
    low still makes it. `factor`: the multiple of k that optimize measured to reach its target
    recall (pick_search), applied to k = 10 at least (what it was measured at); without
    one, the unmeasured default (100 for k up to 25)."""
    if factor is None:
        return max(RERANK_FACTOR * k, MIN_RERANK)
    return factor * max(k, RECALL_K)


@dataclass(frozen=True)
class SearchChoice:
    """How an ANN index is searched: lists scanned, candidates re-ranked (a multiple of k), and
    the recall@10 measured with both."""

    nprobe: int
    rerank_factor: int
    recall: float


def pick_search(
    recall_at: Callable[[int, int], float], nlist: int, list_size: float, target: float
) -> SearchChoice:
    """The cheapest (nprobe, re-ranking factor) whose measured recall@10 (`recall_at(nprobe,
    depth)`) reaches `target`, by search_cost. For each factor of RERANK_FACTORS, the smallest
    nprobe (pick_nprobe) up to NPROBE_SPAN times the one the deepest re-ranking needs; where
    none reaches the target, the deepest re-ranking and all lists it needs."""
    deepest = RERANK_FACTORS[-1]
    nprobe, recall = pick_nprobe(lambda p: recall_at(p, rerank_depth(RECALL_K, deepest)), nlist, target)
    best = SearchChoice(nprobe, deepest, recall)
    cap = min(nlist, NPROBE_SPAN * nprobe)
    for factor in RERANK_FACTORS[:-1]:
        nprobe, recall = pick_nprobe(lambda p: recall_at(p, rerank_depth(RECALL_K, factor)), cap, target)  # noqa: B023
        choice = SearchChoice(nprobe, factor, recall)
        if recall >= target and search_cost(choice, list_size) < search_cost(best, list_size):
            best = choice
    return best


def search_cost(choice: SearchChoice, list_size: float) -> float:
    """Microseconds a top-10 spends scanning lists and reading candidates (the model above)."""
    scan = choice.nprobe * list_size * SCAN_US_PER_CODE
    return scan + rerank_depth(RECALL_K, choice.rerank_factor) * READ_US_PER_CANDIDATE


def filtered_nprobe(nprobe: int, nlist: int, selectivity: float) -> int:
    """nprobe for a filtered search where `selectivity` of the vectors match: the k nearest
    matches lie about as far out as the k/selectivity nearest vectors, so scan 1/selectivity
    times the lists the unfiltered search needs (measured `nprobe`), up to all of them.

    Uncapped: with an ID selector FAISS skips the distance of every id not selected, so the
    extra lists cost walking their ids (and for PQ codes a table per list, ~2.4 us): at 100k x
    512, IVF2048,SQ8, a 1% filter reached recall@10 0.97 at nprobe 300 for 0.7 ms; the former
    cap of 8x left it at 0.74."""
    if selectivity <= 0:
        return nlist
    return int(min(nlist, max(nprobe, math.ceil(nprobe / min(1.0, selectivity)))))


def exact_filter_limit(pq_codes: bool) -> int:
    """A filtered ANN search scores every match exactly when there are at most this many: reading
    them costs less than scanning the lists a rare filter needs (see SMALL_FILTER)."""
    return SMALL_FILTER_PQ if pq_codes else SMALL_FILTER


def post_filter_candidates(depth: int, selectivity: float) -> int:
    """Candidates an unfiltered search returns for post-filtering, so that about `depth` of
    them match (with a margin: the matches near the query vary around the filter's share)."""
    return math.ceil(POST_FILTER_MARGIN * depth / max(selectivity, 1e-9))


def list_share_below(n: int) -> float:
    """The share of an index's `n` images under which a filter's matches are better listed
    (cost ~ share * n) than checked on candidates (cost ~ 1 / share): see LIST_CROSSOVER."""
    return min(1.0, math.sqrt(LIST_CROSSOVER / max(n, 1)))


def list_matches_below(n: int) -> int:
    """Matches under which a filter is listed: count_matches counts this far and no further
    (~0.15 us a row: 3.5 ms at 1M for a filter matching more)."""
    return max(1, math.ceil(list_share_below(n) * n))


def recall_to_measure(target: float, items: int) -> float:
    """The recall the held-out measurement must show for the index's true recall to reach
    `target`: the target plus two standard errors of a proportion over `items` (queries x k).
    Measured on 256 queries, the bare target left 1M structured vectors at 0.950 measured and
    0.949 on fresh queries; with the margin, 0.95 becomes 0.959."""
    if items <= 0 or target >= 1.0:
        return target
    return min(1.0, target + 2.0 * math.sqrt(target * (1.0 - target) / items))


def pick_nprobe(recall_at: Callable[[int], float], nlist: int, target: float) -> tuple[int, float]:
    """The smallest nprobe whose measured recall reaches `target`: doubling from 1, then a
    bisection between the last two powers of two (recall grows with nprobe). All lists scanned
    is the ceiling (recall is then the codes' and the re-ranking's alone)."""
    lo, nprobe = 0, 1
    while True:
        recall = recall_at(nprobe)
        if recall >= target or nprobe >= nlist:
            break
        lo, nprobe = nprobe, min(nlist, nprobe * 2)
    best = (nprobe, recall)
    hi = nprobe
    while hi - lo > max(1, hi // 8):  # within 1/8 of the answer is as fine as it needs to be
        mid = (lo + hi) // 2
        r = recall_at(mid)
        if r >= target:
            hi, best = mid, (mid, r)
        else:
            lo = mid
    return best


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'512M', '2G', '1.5GiB', '100000' -> bytes (powers of 1024)."""
    m = _SIZE.match(text)
    if m is None:
        raise ClipdexError(f"not a size: {text!r} (examples: 512M, 2G)")
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[m.group(2).lower()]
    size = int(float(m.group(1)) * scale)
    if size <= 0:
        raise ClipdexError(f"size must be positive: {text!r}")
    return size


def human(size: int) -> str:
    for unit, scale in (("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f}{unit}"
    return f"{size}B"
