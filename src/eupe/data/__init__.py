"""Datasets: synthetic generation, loading and transforms."""
