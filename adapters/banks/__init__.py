"""Banks: the HTTP client behind the Bank port, which pays merchants out (``http.py``; the sandbox
bank it talks to in development and tests is adapters/dev/bank_server.py)."""
