"""Runs the authors' LightCL.py, unmodified, on an exported stream; writes its final accuracies.

    python benchmarks/side_by_side/run_reference.py --checkout DIR --stream S.npz \
        --seed N [--epochs E] --out RESULT.json

Run as a script (not ``-m``), so that this folder, with its `datasets`
package serving the stream, comes first on ``sys.path``, before the checkout
(`models`, `prune`, `utils` are the checkout's). Arguments to LightCL.py:
``--pretrain`` (the flag turns the pre-trained start *off*) and ``--Seed N``;
it runs from the checkout's folder. Stubbed: ``Tensor.cuda()`` returns the
tensor itself when no GPU is present (the script moves every batch with it).
``--epochs E`` other than the script's 50 runs a temporary copy of LightCL.py
whose one line ``epochs = 50`` says ``epochs = E``. The result file holds
``til`` and ``cil`` (percent), the script's final average accuracies.
"""

import argparse
import json
import os
import runpy
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = "LightCL.py"
EPOCHS_LINE = "epochs = 50"
SCRIPT_EPOCHS = 50


def script_with_epochs(checkout: str, epochs: int, workdir: str) -> str:
    """The path of LightCL.py to run: the checkout's own, or a copy with ``epochs``."""
    original = os.path.join(checkout, SCRIPT)
    if epochs == SCRIPT_EPOCHS:
        return original
    with open(original) as f:
        lines = f.read().split("\n")
    matches = [i for i, line in enumerate(lines) if line.strip() == EPOCHS_LINE]
    if len(matches) != 1:
        raise SystemExit(f"run_reference: {original} has {len(matches)} lines '{EPOCHS_LINE}'; "
                         "--epochs can override exactly one")
    lines[matches[0]] = lines[matches[0]].replace(EPOCHS_LINE, f"epochs = {epochs}")
    copy = os.path.join(workdir, SCRIPT)
    with open(copy, "w") as f:
        f.write("\n".join(lines))
    return copy


def _stub_cuda() -> None:
    try:
        import torch
    except ImportError:
        return  # stub scripts (the harness's tests) need no torch
    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *args, **kwargs: self


def main() -> None:
    parser = argparse.ArgumentParser(prog="run_reference.py", description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", required=True)
    parser.add_argument("--stream", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--epochs", type=int, default=SCRIPT_EPOCHS)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    checkout = os.path.abspath(args.checkout)
    os.environ["LIGHTCL_STREAM"] = os.path.abspath(args.stream)
    out = os.path.abspath(args.out)
    workdir = tempfile.mkdtemp(prefix="lightcl-reference-")
    try:
        script = script_with_epochs(checkout, args.epochs, workdir)
        sys.path[:1] = [HERE, checkout]  # this folder's `datasets` first, then the checkout
        _stub_cuda()
        os.chdir(checkout)
        sys.argv = [script, "--pretrain", "--Seed", str(args.seed)]
        names = runpy.run_path(script, run_name="__main__")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result = {"til": 100.0 * float(names["now_forget_TIL"]),
              "cil": 100.0 * float(names["now_forget_CIL"]), "epochs": args.epochs,
              "script": script if args.epochs == SCRIPT_EPOCHS else f"a copy of {SCRIPT} "
                                                                    f"with epochs = {args.epochs}"}
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
