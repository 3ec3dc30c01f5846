"""Entry points: the composition root, the command line and the Litestar HTTP API."""
