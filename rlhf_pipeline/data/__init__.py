"""Datasets: data cards, loading, and conversion into the canonical forms TRL trainers accept."""
