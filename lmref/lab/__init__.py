"""Tooling, not for copying: the notebooks' glue (rebuild earlier artifacts), the load
generator, local servers for tests and notebooks, the environment report."""
