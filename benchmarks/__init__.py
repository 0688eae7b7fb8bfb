"""Benchmarks (each writes JSON and a plot and prints a table); importable as a package so that
tests and vLLM worker processes can use ``benchmarks.memory``."""
