"""`SequentialTinyImagenet`, which LightCL.py imports; this harness serves CIFAR-10's shape only."""


class SequentialTinyImagenet:
    def __init__(self, args=None):
        raise RuntimeError("benchmarks.vs_reference runs the script with --Dataset CIFAR10 "
                           "(5 tasks of 2 classes); Split TinyImageNet is not served")
