"""lightcl_jax: LightCL (ASP-DAC 2025) continual learning in JAX/Flax, for memory-starved devices.

The public API re-exports the library's pieces; see README.md and BUILD.md.
Each name imports its module on first use (``from lightcl_jax import
train_and_evaluate`` loads the training package, ``import lightcl_jax.config``
loads no JAX).
"""

from lightcl_jax._lazy import lazy_exports

__version__ = "0.1.0"

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "lightcl_jax.config": ("Config", "DEFAULT_METRICS"),
    "lightcl_jax.deploy.export": ("ExportError", "export_run"),
    "lightcl_jax.data.streams": ("Task", "TaskStream", "make_stream", "split_into_tasks",
                                 "validate_stream"),
    "lightcl_jax.memory.feature_memory": ("FeatureMemory", "build_memory", "regulation_loss",
                                          "update_vital_masks", "vital_channel_mask"),
    "lightcl_jax.metrics.generalizability": ("choose_freeze", "generalizability",
                                             "layer_similarities", "learning_plasticity",
                                             "memory_stability"),
    "lightcl_jax.metrics.similarity": ("SIMILARITIES", "Similarity", "cosine_similarity",
                                       "get_similarity", "linear_cka", "param_similarity",
                                       "register_similarity"),
    "lightcl_jax.metrics.continual": ("EvalMetric", "Summary", "average_accuracy",
                                      "average_incremental_accuracy", "backward_transfer",
                                      "cil_predictions", "forgetting", "get_metric",
                                      "register_eval_metric", "register_summary",
                                      "task_cross_entropy", "til_predictions"),
    "lightcl_jax.model.backbone": ("BackboneError", "load_backbone", "save_backbone"),
    "lightcl_jax.model.layers": ("FREEZE_POINTS", "LAYER_GROUPS", "LAYER_NAMES", "TAP_NAMES",
                                 "frozen_groups"),
    "lightcl_jax.model.resnet": ("ResNet", "ResNet18"),
    "lightcl_jax.model.torch_import": ("ConversionError", "convert_state_dict"),
    "lightcl_jax.strategies": ("STRATEGIES", "Strategy", "get_strategy", "hyperparameter",
                               "register_strategy", "strategy_class", "strategy_of"),
    "lightcl_jax.training.checkpoint": ("CheckpointError", "RunCheckpoints"),
    "lightcl_jax.training.epochs": ("DivergenceError",),
    "lightcl_jax.training.step": ("freeze_labels", "make_eval_step", "make_train_step",
                                  "masked_optimizer"),
    "lightcl_jax.training.loop": ("probe_freeze", "train_and_evaluate"),
    "lightcl_jax.training.pretrain": ("PretrainConfig", "pretrain"),
    "lightcl_jax.training.progress": ("Progress",),
    "lightcl_jax.training.run": ("Run", "setup_run"),
    "lightcl_jax.training.state": ("TrainState", "create_train_state"),
})
