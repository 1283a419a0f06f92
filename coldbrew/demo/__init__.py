"""The end-to-end demo, run by ./demo.sh as `python -m coldbrew.demo` (see __main__.py)."""
