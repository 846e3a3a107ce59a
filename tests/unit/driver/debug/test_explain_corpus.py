"""explain over the corpus on simulated nodes: every case gets the verdict the corpus expects."""

from __future__ import annotations

import pytest

from driver.debug.explain import explain, node_from_slices, parse_claim
from tests.unit.driver.debug.corpus import Case, load_corpus, node_slices

CASES = load_corpus()


def test_corpus_is_big_enough():
    assert len(CASES) >= 40
    assert {c.expect for c in CASES} == {"fits", "unschedulable", "rejected"}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case_verdict(case: Case):
    node = node_from_slices(node_slices(case.node, "corpus"))
    exp = explain(parse_claim(case.claim()), node)
    assert exp.verdict == case.expect, f"{case.file}:{case.name}: {exp.reason} {exp.rejections}"
