"""Convert the reference PyTorch checkpoint to a lightcl_jax backbone.

    python -m experiments.convert_torch IN.pth OUT_DIR [--image-size 32] [--overwrite]

IN is the authors' ResNet-18 state_dict (``.pth``/``.pt``, which needs torch,
an optional extra) or an ``.npz`` of the same tensor names. The reference's
``_features.*`` and ``classifier.*`` aliases are accepted and checked against
the tensors they repeat. OUT_DIR becomes a backbone directory
(`lightcl_jax.model.backbone`) that ``python -m experiments.run --init-from
OUT_DIR`` starts from (with a fresh head). Prints what it converted and that
command. Exit codes: 0 done, 2 bad input (the message names it; nothing is written).
"""

from __future__ import annotations

import argparse
import os
import sys

from experiments.cli.common import Parser


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m experiments.convert_torch", description=__doc__.splitlines()[0])
    p.add_argument("input", metavar="IN", help="reference state_dict: .pth/.pt (torch) or .npz")
    p.add_argument("output", metavar="OUT_DIR", help="backbone directory to write")
    p.add_argument("--image-size", type=int, default=32,
                   help="image side the checkpoint was trained at (recorded; default 32)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR backbone")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.image_size < 1:
        parser.error(f"--image-size must be >= 1; got {args.image_size}")
    from lightcl_jax.model.backbone import save_backbone
    from lightcl_jax.model.torch_import import convert_state_dict, read_state_dict
    try:
        state_dict = read_state_dict(args.input)
        variables, info = convert_state_dict(state_dict)
        meta = save_backbone(args.output, variables, {
            "nf": info["nf"], "num_classes": info["num_classes"],
            "in_channels": info["in_channels"],
            "image_shape": [args.image_size, args.image_size, info["in_channels"]],
            "source": {"kind": "convert_torch", "file": os.path.abspath(args.input),
                       "keys": info["keys"], "aliases": info["aliases"]},
        }, overwrite=args.overwrite)
    except (ValueError, ImportError) as err:
        parser.error(str(err))
    print(f"converted {info['keys']} keys ({info['aliases']} aliases checked) of a ResNet-18 "
          f"with nf={meta['nf']}, {meta['num_classes']} classes into {os.path.abspath(args.output)}")
    print(f"start a run from it: python -m experiments.run --init-from {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
