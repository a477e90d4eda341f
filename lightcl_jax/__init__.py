"""lightcl_jax: LightCL (ASP-DAC 2025) continual learning in JAX/Flax, for memory-starved devices.

The public API re-exports the library's pieces; see README.md and BUILD.md.
"""

from lightcl_jax.config import Config
from lightcl_jax.data.streams import Task, TaskStream, make_stream, split_into_tasks
from lightcl_jax.memory.feature_memory import (FeatureMemory, build_memory, regulation_loss,
                                               update_vital_masks, vital_channel_mask)
from lightcl_jax.metrics.generalizability import (choose_freeze, generalizability,
                                                  layer_similarities, learning_plasticity,
                                                  memory_stability)
from lightcl_jax.metrics.similarity import (SIMILARITIES, Similarity, cosine_similarity,
                                            get_similarity, linear_cka, param_similarity,
                                            register_similarity)
from lightcl_jax.metrics.continual import (average_accuracy, backward_transfer, cil_predictions,
                                           forgetting, til_predictions)
from lightcl_jax.model.backbone import BackboneError, load_backbone, save_backbone
from lightcl_jax.model.resnet import LAYER_GROUPS, TAP_NAMES, ResNet, ResNet18
from lightcl_jax.model.torch_import import ConversionError, convert_state_dict
from lightcl_jax.strategies import STRATEGIES, Strategy, get_strategy, register_strategy
from lightcl_jax.training.checkpoint import CheckpointError, RunCheckpoints
from lightcl_jax.training.freezing import FREEZE_POINTS, freeze_labels, masked_optimizer
from lightcl_jax.training.loop import (DivergenceError, TrainState, create_train_state,
                                       make_eval_step, make_train_step, probe_freeze,
                                       train_and_evaluate)
from lightcl_jax.training.pretrain import PretrainConfig, pretrain

__version__ = "0.1.0"

__all__ = [
    "Config", "Task", "TaskStream", "make_stream", "split_into_tasks",
    "FeatureMemory", "build_memory", "regulation_loss", "update_vital_masks", "vital_channel_mask",
    "choose_freeze", "generalizability", "layer_similarities", "learning_plasticity",
    "memory_stability", "SIMILARITIES", "Similarity", "cosine_similarity", "get_similarity",
    "linear_cka", "param_similarity", "register_similarity", "probe_freeze",
    "average_accuracy", "backward_transfer", "cil_predictions", "forgetting", "til_predictions",
    "LAYER_GROUPS", "TAP_NAMES", "ResNet", "ResNet18",
    "BackboneError", "load_backbone", "save_backbone", "ConversionError", "convert_state_dict",
    "PretrainConfig", "pretrain",
    "STRATEGIES", "Strategy", "get_strategy", "register_strategy",
    "CheckpointError", "RunCheckpoints", "FREEZE_POINTS", "freeze_labels", "masked_optimizer",
    "DivergenceError", "TrainState", "create_train_state", "make_eval_step", "make_train_step",
    "train_and_evaluate",
]
