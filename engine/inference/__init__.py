"""Inference: the models behind one async backend each, batched (see ``backend``, ``batcher``, ``runner``)."""

from __future__ import annotations

from .backend import InferenceBackend, LocalBackend
from .batcher import Batcher, BatcherConfig
from .runner import Inference, local_inference

__all__ = ["Batcher", "BatcherConfig", "Inference", "InferenceBackend", "LocalBackend", "local_inference"]
