"""runtime.keep_freed_memory: repeated steps reuse the process's freed memory (few new page faults), and
runtime.num_threads reaches torch. The allocator setting is process-wide and cannot be
undone, so each side runs in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from saq.utils.cpu_runtime import apply_cpu_runtime

# Page faults of a forward-like step (a 32 MiB and a 64 MiB activation, made and freed) repeated 10 times;
# the first two steps warm the heap up and are not counted.
STEADY_STATE_FAULTS = textwrap.dedent("""
    import resource, sys
    import torch
    from saq.utils.cpu_runtime import keep_freed_memory
    if sys.argv[1] == "keep" and not keep_freed_memory():
        print("unsupported"); sys.exit(0)
    def step():
        x = torch.ones(8 * 2**20)
        y = torch.nn.functional.gelu(x.view(2048, -1).repeat(1, 2))
        return float((y * 2).sum(0)[0])
    faults = []
    for _ in range(10):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(sum(faults[2:]))
""")


def _steady_state_faults(mode: str) -> str:
    done = subprocess.run([sys.executable, "-c", STEADY_STATE_FAULTS, mode], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
@pytest.mark.slow
def test_kept_memory_serves_repeated_steps_without_most_page_faults():
    kept = _steady_state_faults("keep")
    if kept == "unsupported":
        pytest.skip("not a glibc system: keep_freed_memory changes nothing here")
    default = int(_steady_state_faults("default"))
    pages = 8 * 96 * 2**20 // 4096  # 8 steps of 96 MiB of fresh activations
    if default < pages // 20:
        pytest.skip(f"{default} faults for 8 steps: this kernel maps huge pages, there is little to save")
    # The default allocator maps every activation anew (one fault per 4 KiB page, about 57k per step); the
    # kept heap serves most steps from freed blocks (small allocations in between split a freed block now
    # and then, so a step may still fault some pages in).
    assert int(kept) < default // 4


def test_runtime_threads_reach_torch():
    import torch

    before = torch.get_num_threads()
    try:
        apply_cpu_runtime({"num_threads": 1, "keep_freed_memory": False})
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
