"""Evaluation metrics for genvl models."""

from genvl.evaluation.reconstruction import evaluate_reconstruction, psnr
from genvl.evaluation.retrieval import chance_recall, retrieval_metrics

__all__ = ["chance_recall", "retrieval_metrics", "psnr", "evaluate_reconstruction"]
