"""Reading a LoRA peaks near its float32 result, whatever the file's dtype: tensors are read a
chunk at a time into their float32 destination, never memory-mapped or held narrow whole.
(Peak memory as :func:`helpers.peak_memory` measures it: the child's VmHWM, reset after a
warm-up, under a malloc that gives freed blocks back.)"""

from __future__ import annotations

import pytest

from helpers import can_measure_peak_memory, peak_memory, wide_peft_adapter

pytestmark = pytest.mark.skipif(
    not can_measure_peak_memory(), reason="reads peak memory from Linux /proc"
)

MiB = 2**20

_LOAD = """
import sys
import loralens as ll


def warm():  # one layer like the big file's: lazy imports, torch's thread pool and their memory
    ll.load_lora(sys.argv[2])


def run():
    lora = ll.load_lora(sys.argv[1])
    return sum(la.U.nbytes + la.V.nbytes for la in lora.layers)
"""


def test_loading_a_float16_file_peaks_near_its_float32_result(tmp_path):
    """load_lora on a 64 MiB float16 adapter: resident memory grows by at most the 128 MiB
    float32 LoRA plus 16 MiB (a layer is 2 MiB); reading everything first and widening it
    after would add 64-190 MiB more."""
    big = wide_peft_adapter(tmp_path / "big", layers=64, width=8192, rank=32)
    small = wide_peft_adapter(tmp_path / "small", layers=1, width=8192, rank=32)
    m = peak_memory(_LOAD, big, small)
    assert m["result"] == 128 * MiB
    assert m["peak"] < m["result"] + 16 * MiB, f"{m['peak'] / MiB:.1f} MiB"
