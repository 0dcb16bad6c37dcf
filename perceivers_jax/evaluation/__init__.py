"""Objective evaluation (BUILD section 7): Table I features, set comparison, repetition, report."""

from perceivers_jax.evaluation.report import evaluate_sets

__all__ = ["evaluate_sets"]
