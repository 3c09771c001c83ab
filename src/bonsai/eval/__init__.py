"""Evaluation: metrics, the evaluator network and image scoring."""

from .evaluate import evaluate_images
from .evaluator import Evaluator, EvaluatorConfig, load_evaluator, save_evaluator
from .metrics import frechet_distance, psnr, retrieval_topk, ssim

__all__ = [
    "Evaluator", "EvaluatorConfig", "evaluate_images", "frechet_distance", "load_evaluator",
    "psnr", "retrieval_topk", "save_evaluator", "ssim",
]
