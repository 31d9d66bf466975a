"""Pure helpers with no MPI and no files: element types, shares -> counts (``plan``),
grid plans, quantisation blocks, argument checks and host storage of user arrays."""
