"""The machinery every command runs on: ``comm`` (the only module that imports mpi4py),
the ``protocol`` of typed headers and rank halves, the ``runtime`` that keeps every rank in
step, the ``driver`` that op modules use to reach the ranks, the rank table, fault injection,
progress bars, host addresses and starting ``mpiexec``."""
