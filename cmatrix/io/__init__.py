"""Matrices in files: loaders and writers per format (``store`` picks one by suffix), the
``.bin`` format, atomic writes, ``out=`` sinks, and the per-node shard files of the cache."""
