"""The benchmark page keeps figures whose results are not on this machine."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import keep_previous  # noqa: E402

OLD = """# Benchmarks

intro

## Speed and memory

Machine A.

### Inference

old inference table

### Successors

old successors

## Accuracy on real data

### ISBI

old isbi table
"""


def test_a_section_without_results_keeps_the_previous_page_text() -> None:
    new = """# Benchmarks

new intro

## Speed and memory

No speed results yet: `python -m benchmarks speed`.

### Successors

new successors

## Accuracy on real data

No accuracy results yet: `python -m benchmarks accuracy`.
""".splitlines()
    page = "\n".join(keep_previous(new, OLD.splitlines()))
    assert "new intro" in page and "intro\n" not in page.replace("new intro\n", "")
    # The speed section's own tables come back; the successors, re-measured, are the new ones.
    assert "Machine A." in page and "old inference table" in page
    assert "new successors" in page and "old successors" not in page
    assert page.index("### Inference") < page.index("### Successors")
    assert "old isbi table" in page and "No accuracy results yet" not in page


def test_a_subsection_without_results_takes_its_old_block_and_fresh_results_win() -> None:
    new = """# Benchmarks

## Speed and memory

Machine B.

### Inference

new inference table

### Successors

No results yet: `python -m benchmarks.successors`.

### Roofline

No results yet: `python -m benchmarks roofline`.
""".splitlines()
    page = "\n".join(keep_previous(new, OLD.splitlines()))
    assert "new inference table" in page and "old inference table" not in page
    assert "old successors" in page and "Machine B." in page and "Machine A." not in page
    # Nothing old to keep: the section says how to produce it.
    assert "No results yet: `python -m benchmarks roofline`." in page
    assert "old isbi table" not in page  # new has no accuracy section: none is invented
