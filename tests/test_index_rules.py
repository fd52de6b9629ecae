"""The rules that choose a vector index by size and memory (retrieval.storage.index_rules)."""

from __future__ import annotations

import math

import pytest

from retrieval.core.errors import ClipdexError
from retrieval.storage import index_rules as rules


def test_small_libraries_keep_exact_flat_search():
    assert rules.choose_plan(49_999, 512).kind == "flat"
    assert rules.choose_plan(49_999, 512).factory == "Flat"
    assert rules.choose_plan(50_000, 512).kind == "ivf"
    assert rules.choose_plan(2_000, 64, exact_below=1_000).kind == "ivf"


@pytest.mark.parametrize("n", [50_000, 200_000, 1_000_000, 3_000_000])
def test_nlist_is_a_power_of_two_between_4_and_8_sqrt_n(n):
    nlist = rules.choose_nlist(n)
    assert nlist & (nlist - 1) == 0
    assert 4 * math.sqrt(n) <= nlist <= 8 * math.sqrt(n)


def test_nlist_is_clamped_and_leaves_k_means_enough_points():
    assert rules.choose_nlist(10**10) == rules.MAX_NLIST
    for n in (1_000, 5_000, 20_000):
        nlist = rules.choose_nlist(n)
        assert nlist * rules.MIN_POINTS_PER_LIST <= n


def test_sq8_while_it_fits_half_the_budget_then_pq_of_dim_over_4():
    assert rules.choose_plan(200_000, 512).codes == "SQ8"  # 104 MB of 512 MB
    plan = rules.choose_plan(1_000_000, 512)
    # Finer PQ codes need fewer candidates re-read from the catalog for the same recall.
    assert plan.factory == "IVF4096_HNSW32,PQ128" and plan.index_bytes <= rules.DEFAULT_MAX_MEMORY
    assert rules.choose_plan(1_000_000, 512, max_memory=2 * 2**30).codes == "SQ8"


def test_pq_shrinks_to_fit_and_a_budget_too_small_is_a_clear_error():
    assert rules.choose_plan(1_000_000, 512, max_memory=100 * 2**20).codes == "PQ64"
    assert rules.choose_plan(1_000_000, 512, max_memory=60 * 2**20).codes == "PQ32"
    assert rules.choose_plan(1_000_000, 512, max_memory=36 * 2**20).codes == "PQ16"
    with pytest.raises(ClipdexError, match="cannot hold an index of 1000000 vectors"):
        rules.choose_plan(1_000_000, 512, max_memory=10 * 2**20)


def test_training_sample_is_bounded():
    assert rules.train_size(60_000, 1024) == 32_768
    assert rules.train_size(1_000_000, 4096) == 131_072
    assert rules.train_size(10**8, 16_384) == rules.MAX_TRAIN
    assert rules.train_size(5_000, 128) == 5_000


def test_rerank_depth_and_filtered_nprobe():
    assert rules.rerank_depth(10) == 100 and rules.rerank_depth(50) == 200
    assert rules.filtered_nprobe(16, 4096, 0.5) == 32
    assert rules.filtered_nprobe(16, 4096, 0.01) == 1600  # uncapped: selectors skip the rest cheaply
    assert rules.filtered_nprobe(16, 64, 0.01) == 64  # and at every list
    assert rules.filtered_nprobe(16, 4096, 1.0) == 16


def test_pick_nprobe_finds_the_smallest_that_reaches_the_target():
    calls: list[int] = []

    def recall(nprobe: int) -> float:  # monotone, reaches 0.95 at nprobe 37
        calls.append(nprobe)
        return min(1.0, 0.5 + 0.45 * nprobe / 37)

    nprobe, r = rules.pick_nprobe(recall, 4096, 0.95)
    assert r >= 0.95 and 37 <= nprobe <= 37 + 64 // 8
    assert len(calls) <= 12
    assert rules.pick_nprobe(lambda p: 0.5, 64, 0.95) == (64, 0.5)  # unreachable: every list
    assert rules.pick_nprobe(lambda p: 1.0, 64, 0.95) == (1, 1.0)


@pytest.mark.parametrize(
    ("text", "size"), [("512M", 512 * 2**20), ("2G", 2 * 2**30), ("1.5GiB", 3 * 2**29), ("1000", 1000)]
)
def test_parse_size(text, size):
    assert rules.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "-1G", "0"])
def test_parse_size_refuses_nonsense_in_one_line(text):
    with pytest.raises(ClipdexError, match="size"):
        rules.parse_size(text)


def test_the_measured_recall_must_clear_the_target_by_its_sampling_error():
    # 256 held-out queries x 10: a measured 0.950 is as likely below 0.95 as above
    assert rules.recall_to_measure(0.95, 2560) == pytest.approx(0.95 + 2 * (0.95 * 0.05 / 2560) ** 0.5)
    assert 0.958 < rules.recall_to_measure(0.95, 2560) < 0.960
    assert rules.recall_to_measure(0.95, 10**8) == pytest.approx(0.95, abs=1e-4)  # many: no margin
    assert rules.recall_to_measure(1.0, 2560) == 1.0 and rules.recall_to_measure(0.9, 0) == 0.9


def test_a_measured_rerank_factor_sets_the_depth_for_k_10_and_above():
    assert rules.rerank_depth(10, 3) == 30 and rules.rerank_depth(11, 3) == 33
    assert rules.rerank_depth(1, 3) == 30  # measured at k = 10: never fewer candidates than that
    assert rules.rerank_depth(10, None) == 100  # unmeasured: the default


def _recall_model(nprobe: int, depth: int) -> float:
    """Recall that grows with both nprobe and depth, saturating (like a real index's)."""
    return min(1.0, 0.5 + 0.1 * math.log2(nprobe + 1)) * min(1.0, 0.6 + depth / 100)


def test_pick_search_takes_the_cheapest_nprobe_and_depth_that_reach_the_target():
    calls: list[tuple[int, int]] = []

    def recall_at(nprobe: int, depth: int) -> float:
        calls.append((nprobe, depth))
        return _recall_model(nprobe, depth)

    choice = rules.pick_search(recall_at, nlist=4096, list_size=250, target=0.8)
    assert choice.recall >= 0.8 and choice.recall == _recall_model(choice.nprobe, choice.rerank_factor * 10)
    assert choice.rerank_factor < rules.RERANK_FACTORS[-1]  # a shallower re-ranking paid here
    every = [
        rules.SearchChoice(p, f, _recall_model(p, f * 10))
        for f in rules.RERANK_FACTORS
        for p in range(1, 4097)
        if _recall_model(p, f * 10) >= 0.8
    ]
    cheapest = min(rules.search_cost(c, 250) for c in every)
    # pick_nprobe bisects to within 1/8 of the smallest nprobe: near the cheapest, not off it.
    assert rules.search_cost(choice, 250) <= 1.15 * cheapest
    assert max(p for p, _ in calls) <= 4096


def test_pick_search_keeps_the_deepest_re_ranking_when_shallower_ones_miss_the_target():
    def recall_at(nprobe: int, depth: int) -> float:
        return 0.97 if depth >= 100 else 0.9

    choice = rules.pick_search(recall_at, nlist=64, list_size=1000, target=0.95)
    assert (choice.nprobe, choice.rerank_factor, choice.recall) == (1, rules.RERANK_FACTORS[-1], 0.97)


def test_many_lists_are_found_through_an_hnsw_graph_few_by_a_flat_scan():
    assert rules.choose_plan(1_000_000, 512).factory.startswith("IVF4096_HNSW32,")
    assert rules.choose_plan(60_000, 64).factory.startswith("IVF1024_HNSW32,")
    assert rules.choose_plan(2_000, 64, exact_below=1_000).factory.startswith("IVF32,")  # 32 lists
    assert rules.quantizer_ef(7) == rules.HNSW_MIN_EF and rules.quantizer_ef(50) == 100
