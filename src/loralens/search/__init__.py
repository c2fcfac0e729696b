"""Embeddings of adapters (a run's ``embed`` or unsupervised spectral features) and indexes
to search a store for the adapters nearest a query."""
