"""Property-based fuzzing of the readers (small budget; benchmarks/fuzz_readers.py runs longer):
on any input, load_lora returns a finite float32 LoRA or raises LoRAFormatError, in bounded
time, never anything else."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from reader_fuzz import cases, outcome


@settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(cases())
def test_readers_refuse_or_load_finite_float_loras(case):
    result, detail = outcome(case)
    assert result in ("loaded", "refused"), f"{case[0]} case {sorted(case[1])}: {result}: {detail}"
