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


def test_sq8_while_it_fits_half_the_budget_then_pq_of_dim_over_8():
    assert rules.choose_plan(200_000, 512).codes == "SQ8"  # 104 MB of 512 MB
    plan = rules.choose_plan(1_000_000, 512)
    assert plan.factory == "IVF4096,PQ64" and plan.index_bytes <= rules.DEFAULT_MAX_MEMORY
    assert rules.choose_plan(1_000_000, 512, max_memory=2 * 2**30).codes == "SQ8"


def test_pq_shrinks_to_fit_and_a_budget_too_small_is_a_clear_error():
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
