"""Evaluation suite: generated vs baseline initialisations, fine-tuning curves, memorisation, FID/L1.

Public API::

    from rayweights.evaluation import (TaskAdapter, WeightSampler, BaseTaskAdapter, load_layout_params,
        EvalOptions, ZooReference, evaluate_task, score_samples, TaskResult, write_report,
        make_adapter, register_adapter, compute_fid, compute_kid, image_metrics, build_feature_extractor,
        save_images, TrainedFeatureExtractor, train_feature_extractor, ensure_trained_extractor,
        image_features, feature_metrics, extractor_label, zoo_extractor_spec)
    from rayweights.evaluation.cli import EvaluateConfig, evaluate, main
    from rayweights.evaluation.diagnostics import diagnose, Diagnosis          # generator vs zoo checks
    from rayweights.evaluation.memorisation import memorisation_study      # Zeng et al. novelty
"""

from .adapters import AdapterError, make_adapter, register_adapter
from . import families  # noqa: F401  (registers the built-in families: dataset-subsets, partial, concepts)
from .diagnostics import Diagnosis, diagnose
from .memorisation import MemorisationResult, memorisation_study
from .core import ALL_INITS, INIT_LABELS, Curve, EvalOptions, TaskResult, ZooReference, evaluate_task, score_samples
from .fid import (ExtractorReport, FIDError, SmallFeatureExtractor, TrainedFeatureExtractor, build_feature_extractor,
                  compute_fid, compute_kid, edit_op_training_set, ensure_trained_extractor, extractor_label,
                  feature_metrics, image_features, image_metrics, save_images, train_feature_extractor,
                  zoo_extractor_spec)
from .protocols import BaseTaskAdapter, TaskAdapter, WeightSampler, load_layout_params, token_similarity
from .report import render_markdown, verdict_sentences, write_report

__all__ = ["TaskAdapter", "WeightSampler", "BaseTaskAdapter", "load_layout_params", "token_similarity",
           "EvalOptions", "ZooReference", "evaluate_task", "score_samples", "TaskResult", "Curve", "ALL_INITS",
           "INIT_LABELS", "write_report", "render_markdown", "verdict_sentences", "make_adapter", "register_adapter",
           "AdapterError", "compute_fid", "compute_kid", "image_metrics", "build_feature_extractor", "save_images",
           "SmallFeatureExtractor", "TrainedFeatureExtractor", "ExtractorReport", "train_feature_extractor",
           "edit_op_training_set", "ensure_trained_extractor", "image_features", "feature_metrics",
           "extractor_label", "zoo_extractor_spec",
           "FIDError", "Diagnosis", "diagnose", "MemorisationResult", "memorisation_study"]
