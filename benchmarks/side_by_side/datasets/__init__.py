"""The `datasets` package the authors' LightCL.py imports, serving an exported stream.

Only the names LightCL.py uses exist: `seq_cifar10.SequentialCIFAR10` and
`seq_tinyimagenet.SequentialTinyImagenet`.
"""
