"""Command-line tools (run as scripts: .venv/bin/python tools/NAME.py ...; importable as tools.NAME)."""
