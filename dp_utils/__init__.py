"""dp_utils: DP-SGD for Diffusion Transformers with exact, fast per-example clipping."""

from opacus.utils.batch_memory_manager import BatchMemoryManager

from .clipping.engine import ClippingEngine, UnsupportedModuleError
from .clipping.freezing import freeze_embedders
from .clipping.groups import RowGroups
from .clipping.losses import DPCriterion, DPLoss, per_sample_mse
from .privacy.cuda_graphs import CudaGraphedStep
from .privacy.optimizer import DPOptimizer
from .privacy.physical_batches import PhysicalBatchLoader
from .privacy.privacy_engine import GRAD_SAMPLE_MODES, PrivacyEngine, make_private
from .privacy.sampling import PoissonBatchSampler, poisson_data_loader

__all__ = [
    "BatchMemoryManager",
    "ClippingEngine",
    "CudaGraphedStep",
    "DPCriterion",
    "DPLoss",
    "DPOptimizer",
    "GRAD_SAMPLE_MODES",
    "PhysicalBatchLoader",
    "PoissonBatchSampler",
    "PrivacyEngine",
    "RowGroups",
    "UnsupportedModuleError",
    "freeze_embedders",
    "make_private",
    "per_sample_mse",
    "poisson_data_loader",
]
