"""Benchmark and profiling library behind `dit-fast bench|parity|kernels|profile` (results as JSON, Markdown, PNG)."""
