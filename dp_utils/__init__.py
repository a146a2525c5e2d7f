"""dp_utils: DP-SGD for Diffusion Transformers with exact, fast per-example clipping."""

from opacus.utils.batch_memory_manager import BatchMemoryManager

from .engine import ClippingEngine, UnsupportedModuleError
from .freezing import freeze_embedders
from .groups import RowGroups
from .losses import DPCriterion, DPLoss, per_sample_mse
from .privacy import GRAD_SAMPLE_MODES, PrivacyEngine, make_private
from .sampling import PoissonBatchSampler, poisson_data_loader

__all__ = [
    "BatchMemoryManager",
    "ClippingEngine",
    "DPCriterion",
    "DPLoss",
    "GRAD_SAMPLE_MODES",
    "PoissonBatchSampler",
    "PrivacyEngine",
    "RowGroups",
    "UnsupportedModuleError",
    "freeze_embedders",
    "make_private",
    "per_sample_mse",
    "poisson_data_loader",
]
