"""The theoretical accounting against the paper's Table 1, every row, both datasets.

    python -m experiments.paper_table

Prints, per dataset and row of the paper's Table 1, the theoretical memory (MB)
and FLOPs beside the paper's figures and the difference in percent. Pure
arithmetic (`lightcl_jax.accounting.theoretical_cost`); nothing is trained or
compiled. The conventions, and why LightCL's and sparse LightCL's memory rows do
not reproduce, are in BUILD.md and the theory module's docstring.
"""

import sys

from lightcl_jax.accounting.theory import reproduction_table


def main() -> int:
    print(reproduction_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
