"""The speed harness: featurizers and models at GPT-3 shapes against the machine's own floor
(``models``), the factor route (Gram or QR) vs the dense route for singular values (``svals``),
packed-store throughput vs PEFT folders (``store``), and training throughput (``train``); the
floors and the machine are measured in ``measure``, the run is put together in ``harness`` and
written out by ``report``.

Everything here is measurement, never an assertion: ``python benchmarks/speed.py`` calls
:func:`speedbench.harness.run` and writes a markdown report + JSON.

What the numbers mean
---------------------
- Times are per LoRA: the time of one call on a batch of ``B`` LoRAs divided by ``B``. Each cell
  is warmed up once, then repeated until ``min_repeats`` calls and ``budget_s`` seconds have
  passed; the table shows the best call (the machine is shared, so the best call is the one
  least disturbed), the JSON also has the median.
- Floor: ``max(bytes / read bandwidth, flops / matmul rate)`` (a roofline), with the bandwidth
  (sum over a 256 MiB tensor) and matmul rate (a large GEMM) measured at the start of the same
  run. ``bytes`` counts what the call must read or write at least once: its input tensors, the
  model's parameters (for a forward) and its output features (for a featurizer). ``flops``
  counts matmuls with ``torch.utils.flop_counter.FlopCounterMode`` plus QR and SVD at the
  textbook estimates ``ll.model_cost`` uses (2 m n^2 and 14 m n^2).
- Peak memory (CPU): the rise of the process's peak resident set (``VmHWM``, reset through
  ``/proc/self/clear_refs``) over the resident set just before the model is built, while the
  model is built and one featurize + forward runs: parameters + features + activations, not
  the input batch (given separately). Each shape runs in its own process started with
  ``MALLOC_MMAP_THRESHOLD_`` fixed, so freed blocks go back to the OS and cannot hide a later
  peak. CUDA: ``torch.cuda.max_memory_allocated`` over the same window.
"""
