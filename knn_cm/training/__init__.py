"""Training: iCT, EDM and flow-matching objectives with pluggable estimators, and one trainer loop for all."""

from knn_cm.runs.checkpoints import latest_checkpoint, list_checkpoints, load_checkpoint
from knn_cm.training.config import TrainerConfig, trainer_config
from knn_cm.training.distributed import DistributedContext
from knn_cm.training.edm import EDMObjective
from knn_cm.training.ema import EMA
from knn_cm.training.flow_matching import FlowMatchingObjective
from knn_cm.training.guard import NonFiniteLossError
from knn_cm.training.ict import ICTObjective, curriculum_steps, karras_levels, level_probabilities, pseudo_huber
from knn_cm.training.objective import Objective, StepRandom
from knn_cm.training.outputs import save_image_grid
from knn_cm.training.trainer import Trainer

__all__ = ["DistributedContext", "EDMObjective", "EMA", "FlowMatchingObjective", "ICTObjective", "NonFiniteLossError",
           "Objective", "StepRandom", "Trainer", "TrainerConfig", "curriculum_steps", "karras_levels",
           "latest_checkpoint", "level_probabilities", "list_checkpoints", "load_checkpoint", "pseudo_huber",
           "save_image_grid", "trainer_config"]
