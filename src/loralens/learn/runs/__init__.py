"""The run folder: saving it, loading it back as a ``Run``, predicting on adapters, evaluating
on a store, which LoRAs it learned from, and how its metrics read."""
