import subprocess
import sys

import pytest

# Page faults of 64 MiB allocations (over glibc's highest mmap threshold), each touched and freed
# at once: one pass with the default heap, then passes 4-8 after the change. The first passes
# after it may grow the heap (a small object can land in a freed block and split it); from then
# on the heap holds what the pattern needs.
CHILD = """
import resource, sys
import torch
from densepred.allocator import retain_freed_memory

def faults_of(passes):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(passes):
        torch.empty(16 << 20).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults_of(1)
plain = faults_of(1)
took = retain_freed_memory()
faults_of(3)
retained = faults_of(5)
print(took, plain, retained)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_retained_memory_is_reused_without_page_faults():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True).stdout.split()
    took, plain, retained = out[0] == "True", int(out[1]), int(out[2])
    if not took:
        pytest.skip("not glibc")
    if plain < 1_000:  # transparent huge pages: a few 2 MiB faults, nothing to win
        pytest.skip(f"the OS maps the block in huge pages ({plain} faults)")
    assert plain > 10_000  # 16,384 pages of 4 KiB mapped and zero-filled again
    assert retained < plain // 2  # not one block mapped afresh in five passes
