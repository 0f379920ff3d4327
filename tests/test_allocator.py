import subprocess
import sys

import pytest

# Page faults of one 64 MiB allocation, touched, freed, then allocated and touched again.
CHILD = """
import resource, sys
import torch
from densepred.allocator import retain_freed_memory

def faults_of_a_second_pass():
    torch.empty(16 << 20).fill_(1.0)  # 64 MiB, over glibc's highest mmap threshold; freed at once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(16 << 20).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

plain = faults_of_a_second_pass()
took = retain_freed_memory()
retained = faults_of_a_second_pass()
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
    assert retained < plain // 20
