"""runtime.keep_freed_memory: a large tensor allocated again reuses the process's memory (no new page
faults), and runtime.num_threads reaches torch. The allocator setting is process-wide and cannot be
undone, so each side runs in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from saq.utils.cpu_runtime import apply_cpu_runtime

# Page faults of the second of two 64 MiB tensors, each filled once and freed.
SECOND_TENSOR_FAULTS = textwrap.dedent("""
    import resource, sys
    import torch
    from saq.utils.cpu_runtime import keep_freed_memory
    if sys.argv[1] == "keep" and not keep_freed_memory():
        print("unsupported"); sys.exit(0)
    def filled():
        t = torch.empty(16 * 2**20, dtype=torch.float32)
        t.fill_(1.0)
        return t
    x = filled(); del x
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = filled(); del x
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _second_tensor_faults(mode: str) -> str:
    done = subprocess.run([sys.executable, "-c", SECOND_TENSOR_FAULTS, mode], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_kept_memory_serves_a_repeated_large_tensor_without_new_page_faults():
    kept = _second_tensor_faults("keep")
    if kept == "unsupported":
        pytest.skip("not a glibc system: keep_freed_memory changes nothing here")
    default = int(_second_tensor_faults("default"))
    pages = 64 * 2**20 // 4096
    if default < pages // 20:
        pytest.skip(f"{default} faults for 64 MiB: this kernel maps huge pages, there is little to save")
    # the default allocator maps the 64 MiB anew (one fault per 4 KiB page); the kept heap serves it as it is
    assert int(kept) < pages // 20


def test_runtime_threads_reach_torch():
    import torch

    before = torch.get_num_threads()
    try:
        apply_cpu_runtime({"num_threads": 1, "keep_freed_memory": False})
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
