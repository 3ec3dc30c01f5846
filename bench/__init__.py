"""Benchmarks: our code against a baseline on the same machine, in interleaved rounds
(``make bench``, ``python -m bench --help``). Reports cost ratios; never a gate."""
