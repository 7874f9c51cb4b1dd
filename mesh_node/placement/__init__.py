"""Placement: who hosts which model, who holds which experts. Pure functions of gossiped
state: every node computes the same answer from the same view, with no voting."""
