import dataclasses

from lightcl_jax.accounting import compiled_train_step_cost
from lightcl_jax.config import Config

TINY = Config(dataset="digits", nf=8, batch_size=16, buffer_size=8)


def test_frozen_step_compiles_to_fewer_bytes_and_flops_than_the_unfrozen_step():
    shape = (8, 8, 1)
    finetune = compiled_train_step_cost(dataclasses.replace(TINY, strategy="finetune"), shape,
                                        10, 2, task_index=1)
    lightcl = compiled_train_step_cost(dataclasses.replace(TINY, strategy="lightcl"), shape,
                                       10, 2, task_index=1)
    assert lightcl["phase"] == {"frozen": ["stem", "stage1", "stage2", "stage3"], "memory": True}
    assert finetune["phase"] == {"frozen": [], "memory": False}
    # No gradients or kept activations for the frozen prefix: fewer temporaries and FLOPs,
    # even though LightCL adds a forward pass over its buffer.
    assert lightcl["temp_bytes"] < finetune["temp_bytes"]
    assert lightcl["train_bytes"] < finetune["train_bytes"]
    assert lightcl["flops"] < finetune["flops"]
    # LightCL's task 0 without pre-training trains everything, as finetune does.
    task0 = compiled_train_step_cost(dataclasses.replace(TINY, strategy="lightcl"), shape, 10, 2,
                                     task_index=0)
    assert task0["phase"] == {"frozen": [], "memory": False}
    assert task0["flops"] == finetune["flops"]
