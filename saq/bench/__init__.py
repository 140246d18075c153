"""Benchmarks users run before or after a long job: ``python -m saq.bench recipe|deploy|profile|memory|recon-step``.

Each writes JSON (and a markdown summary where it has one); speed and memory are measured here, never by
timed tests. docs/running.md and results/bench/README.md show the commands and what they measured.
"""
