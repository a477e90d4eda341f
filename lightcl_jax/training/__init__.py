"""lightcl_jax.training: the continual-learning run, one module per idea.

`lightcl_jax.training.loop.train_and_evaluate` is the entry point; its module
docstring maps the others, and BUILD.md ("Layout and data flow") says what each
owns and draws how a run flows through them.
"""
