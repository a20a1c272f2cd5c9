"""The commands: `edge` (cli: detect, weights; evaluate, parity, bench, soak, demo, train, compress) and the
argument helpers they share. Nothing outside this package imports it, except `converters.cli` (`edge-convert`)."""
