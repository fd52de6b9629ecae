"""Duplicate groups equal the connected components of a brute-force threshold graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from retrieval.core.errors import ClipdexError
from retrieval.search.duplicates import DuplicateGroup


def brute_force_groups(corpus: dict, threshold: float) -> tuple[list[list[int]], set[tuple[int, int]]]:
    """Components (each sorted, of 2+ members) of the graph with an edge where cosine > threshold."""
    ids = corpus["ids"].tolist()
    sims = corpus["vectors"] @ corpus["vectors"].T
    n = len(ids)
    edges = {(ids[a], ids[b]) for a in range(n) for b in range(a + 1, n) if sims[a, b] > threshold}
    neighbours: dict[int, set[int]] = {i: set() for i in ids}
    for a, b in edges:
        neighbours[a].add(b)
        neighbours[b].add(a)
    seen: set[int] = set()
    groups = []
    for start in ids:
        if start in seen or not neighbours[start]:
            continue
        stack, comp = [start], set()
        while stack:
            node = stack.pop()
            if node not in comp:
                comp.add(node)
                stack.extend(neighbours[node] - comp)
        seen |= comp
        groups.append(sorted(comp))
    return groups, edges


def _clear_of(corpus: dict, threshold: float, margin: float = 1e-5) -> bool:
    """No pair scores within `margin` of the threshold (where float rounding could flip it)."""
    sims = corpus["vectors"] @ corpus["vectors"].T
    iu = np.triu_indices(len(sims), 1)
    return bool(np.all(np.abs(sims[iu] - threshold) > margin))


@pytest.mark.parametrize("threshold", [0.999, 0.99, 0.987, 0.985, 0.98, 0.97, 0.95, 0.5])
def test_groups_equal_brute_force_components(corpus, idx, threshold):
    assert _clear_of(corpus, threshold)
    want, edges = brute_force_groups(corpus, threshold)
    groups = idx.duplicates(threshold)
    assert sorted(list(g.ids) for g in groups) == sorted(want)
    sizes = [len(g) for g in groups]
    assert sizes == sorted(sizes, reverse=True)  # largest group first
    assert {(a, b) for g in groups for a, b, _ in g.pairs} == edges
    sims = corpus["vectors"] @ corpus["vectors"].T
    pos = {int(i): n for n, i in enumerate(corpus["ids"])}
    for g in groups:
        assert g.paths == tuple(corpus["records"][i].path for i in g.ids)
        for a, b, s in g.pairs:
            assert a < b and s > threshold
            assert s == pytest.approx(sims[pos[a], pos[b]], abs=1e-5)
        assert [s for _, _, s in g.pairs] == sorted((s for _, _, s in g.pairs), reverse=True)
        block = sims[np.ix_([pos[i] for i in g.ids], [pos[i] for i in g.ids])]
        off = block[~np.eye(len(g.ids), dtype=bool)]
        assert g.min_score == pytest.approx(off.min(), abs=1e-6)
        assert g.max_score == pytest.approx(off.max(), abs=1e-6)


def test_near_duplicates_pair_up(corpus, idx):
    """At a strict threshold the groups are exactly the resized copies and the byte-identical copy."""
    groups = idx.duplicates(0.999)
    names = sorted(sorted(Path(p).name for p in g.paths) for g in groups)
    assert names == [
        ["copy_of_scene000.png", "scene000.png"],
        ["dup0.png", "dup0_small.png"],
        ["dup1.png", "dup1_small.png"],
        ["dup2.png", "dup2_small.png"],
    ]
    assert all(isinstance(g, DuplicateGroup) and len(g.pairs) == 1 for g in groups)
    for g in idx.duplicates(1.0):  # identical vectors may score a rounding error above 1
        assert sorted(Path(p).name for p in g.paths) == ["copy_of_scene000.png", "scene000.png"]


def test_group_to_dict(idx):
    g = idx.duplicates(0.999)[0].to_dict()
    assert g["size"] == 2 and len(g["members"]) == 2 and len(g["pairs"]) == 1
    assert set(g["members"][0]) == {"id", "path"} and set(g["pairs"][0]) == {"a", "b", "score"}


def test_bad_threshold(idx):
    with pytest.raises(ClipdexError):
        idx.duplicates(1.5)
