"""On-device scripts: benchmarks and parity tests that need only numpy and the device's runtime.
(Not built yet: see the benchmarks and parity issues.)"""
