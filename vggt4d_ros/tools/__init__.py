"""Command-line tools over the same engine the node uses: synthetic world, replay,
evaluation, dataset benchmark, GPU benchmarks and the demo."""
