"""lightcl_jax.training: the continual-learning loop and its parts, one module per job.

`lightcl_jax.training.loop.train_and_evaluate` is the entry point; its module
docstring maps the other modules. BUILD.md ("Layout and data flow") draws how
a run flows through them.
"""
