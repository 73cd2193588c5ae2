"""The figures README.md and docs/performance.md quote match the results files they come from."""

from __future__ import annotations

import re

from benchmarks import figures

RATIO = re.compile(r"\d+\.\d+ ?[x×]")
"""A quoted ratio such as "0.77x" or "2.34×"."""


def _outside_blocks(text: str) -> str:
    return re.sub(r"<!-- figures:(\S+) -->.*?<!-- /figures:\1 -->", "", text, flags=re.DOTALL)


def test_every_quoted_block_matches_its_results_file():
    for doc in figures.DOCUMENTS:
        text = (figures.ROOT / doc).read_text(encoding="utf-8")
        assert "<!-- figures:full-bench -->" in text, f"{doc} quotes no generated figures"
        assert figures.stale_blocks(text) == [], f"{doc}: run `python -m benchmarks.figures`"


def test_a_figure_that_drifts_from_its_file_is_caught():
    text = (figures.ROOT / "README.md").read_text(encoding="utf-8")
    value = figures.render("full-bench").split("| c / a: student route, mode-cotd / `vllm serve` | ")[1][:5]
    drifted = text.replace(f"| c / a: student route, mode-cotd / `vllm serve` | {value} |",
                           "| c / a: student route, mode-cotd / `vllm serve` | 0.967 |")
    assert drifted != text
    assert figures.stale_blocks(drifted) == ["full-bench"]
    assert figures.stale_blocks(figures.rewrite(drifted)) == []


def test_a_value_is_never_rounded_onto_its_target():
    assert figures._number(0.7951, 0.8) == "0.795"
    assert figures._number(0.79951, 0.8) == "0.7995"
    assert figures._number(1.0998, 1.1) == "1.0998"


def test_readme_prose_quotes_ratios_only_beside_their_results_file():
    """Outside the generated blocks, a paragraph that quotes a ratio names the results it comes from."""
    prose = _outside_blocks((figures.ROOT / "README.md").read_text(encoding="utf-8"))
    for paragraph in prose.split("\n\n"):
        if RATIO.search(paragraph) and "benchmarks/results/" not in paragraph:
            raise AssertionError(f"a ratio quoted without its results file: {paragraph[:300]!r}")
