"""Domain unit tests: pure, no I/O; a package so test module names cannot clash with other suites."""
