"""What a compiled step holds at its peak: XLA's own live set, value by value.

`compiled_cost` gives a step's bytes as XLA's memory analysis sums them
(arguments + temporaries + outputs not aliased). This module says which
values make up that figure: it compiles the lowered step once more with
XLA's dump switched on (``xla_dump_to``, a per-compile option, into a
temporary folder), reads the live set XLA's heap simulator found at the
peak (``*-live-range.txt``, "Live ranges at T (peak)") and the optimised
HLO (``*cpu_after_optimizations.txt``), and describes each live value:
its bytes, the HLO op that made it, JAX's ``op_name`` for it, and which
argument it holds (the argument itself, a copy XLA made of it, or the output
donated back into it). `train_step_terms` sorts a train step's live set into
the terms the paper's theoretical memory counts.

The live values' bytes add up to the heap simulator's peak; the step's
bytes exceed them by what packing the buffers into allocations leaves
unused (`PeakLiveSet.packing_bytes`). The dump formats are XLA's debugging
output, not an API: `parse_dump` raises if they change shape.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import tempfile

from lightcl_jax.compiler import compiled_cost

_PEAK = re.compile(r"^\s*Live ranges at (\d+) \(peak\):\s*$")
_LIVE = re.compile(r"^\s+(\S+?)\{[\d,]*\}: (\d+) bytes")
_INSTR = re.compile(r"^\s+(ROOT )?%?([\w.\-]+) = (\(.*?\)|\S+) ([\w\-]+)\((.*)$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_ALIAS = re.compile(r"\{(\d+)\}: \((\d+), \{\}")
_DIMS = re.compile(r"^[a-z]+\d*\[([\d,]*)\]")


@dataclasses.dataclass(frozen=True)
class LiveValue:
    """One value live at the peak.

    ``parameter`` is the entry parameter the value holds, if any: the argument
    itself (``role`` "argument"), a copy XLA made of it ("copy of argument"),
    or the output written back into its donated buffer ("output into
    argument"); other values are "computed".
    """
    name: str
    bytes: int
    opcode: str
    shape: tuple[int, ...] | None
    op_name: str
    parameter: str | None
    role: str


@dataclasses.dataclass(frozen=True)
class PeakLiveSet:
    """The values live at a compiled step's peak (XLA's heap simulator), and its bytes."""
    time: int
    values: tuple[LiveValue, ...]
    step_bytes: int
    # Entry parameters the step returns changed (its output into their buffer is not
    # the parameter itself): name -> dimensions.
    updated: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)

    @property
    def live_bytes(self) -> int:
        return sum(v.bytes for v in self.values)

    @property
    def packing_bytes(self) -> int:
        """Step bytes not held by a live value at the peak: what packing the buffers left."""
        return self.step_bytes - self.live_bytes


def peak_live_set(lowered) -> PeakLiveSet:
    """Compiles ``lowered`` (a `jax.stages.Lowered`) with XLA's dump on and reads its peak.

    The compile options the function was jitted with stay in force; only the
    dump is added, so the program (and its figures) are those of a plain compile.
    """
    with tempfile.TemporaryDirectory(prefix="lightcl-xla-dump-") as folder:
        compiled = lowered.compile(compiler_options={"xla_dump_to": folder})
        step_bytes = compiled_cost(compiled)["step_bytes"]
        return parse_dump(folder, step_bytes)


def _one(folder: str, suffix: str) -> str:
    paths = sorted(glob.glob(os.path.join(folder, f"*{suffix}")))
    if not paths:
        raise ValueError(f"no XLA dump file *{suffix} in {folder}")
    with open(paths[-1]) as f:  # the last module compiled
        return f.read()


def _entry(hlo: str) -> tuple[dict, list[str], dict[int, int]]:
    """The ENTRY computation's instructions, its ROOT's operands, output -> parameter aliases."""
    header = hlo.split("\n", 1)[0]
    aliases = {int(out): int(param) for out, param in _ALIAS.findall(header)}
    body = hlo[hlo.index("\nENTRY "):]
    body = body[body.index("\n", 1):body.index("\n}")]
    instrs, root = {}, []
    for line in body.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        is_root, name, shape, opcode, rest = m.groups()
        operands = re.findall(r"%([\w.\-]+)", rest.split("), ")[0]) if "%" in rest else []
        dims = _DIMS.match(shape)
        number = re.match(r"(\d+)\)", rest) if opcode == "parameter" else None
        op_name = _OP_NAME.search(line)
        instrs[name] = {
            "opcode": opcode, "operands": operands,
            "shape": tuple(int(d) for d in dims.group(1).split(",") if d) if dims else None,
            "op_name": op_name.group(1) if op_name else "",
            "parameter_number": int(number.group(1)) if number else None,
        }
        if is_root:
            root = operands if opcode == "tuple" else [name]
    return instrs, root, aliases


def parse_dump(folder: str, step_bytes: int) -> PeakLiveSet:
    """Reads one compiled module's dump in ``folder`` (see the module docstring)."""
    live_text = _one(folder, "-live-range.txt")
    hlo = _one(folder, "cpu_after_optimizations.txt")
    instrs, root, aliases = _entry(hlo)
    params = {i["parameter_number"]: n for n, i in instrs.items() if i["opcode"] == "parameter"}
    into_param = {root[out]: params[p] for out, p in aliases.items()
                  if out < len(root) and p in params}
    updated = {param: instrs[param]["shape"] for out, param in into_param.items()
               if out != param}
    lines = live_text.splitlines()
    starts = [i for i, line in enumerate(lines) if _PEAK.match(line)]
    if not starts:
        raise ValueError(f"no peak live set in the XLA dump in {folder}: its format changed?")
    time = int(_PEAK.match(lines[starts[0]]).group(1))
    values = []
    for line in lines[starts[0] + 1:]:
        m = _LIVE.match(line)
        if not m:
            break
        name, size = m.group(1), int(m.group(2))
        instr = instrs.get(name, {"opcode": "?", "operands": [], "shape": None, "op_name": ""})
        parameter, role = None, "computed"
        if instr["opcode"] == "parameter":
            parameter, role = name, "argument"
        elif instr["opcode"] == "copy" and instrs.get(
                (instr["operands"] or [""])[0], {}).get("opcode") == "parameter":
            parameter, role = instr["operands"][0], "copy of argument"
        elif name in into_param:
            parameter, role = into_param[name], "output into argument"
        values.append(LiveValue(name=name, bytes=size, opcode=instr["opcode"],
                                shape=instr["shape"], op_name=instr["op_name"],
                                parameter=parameter, role=role))
    return PeakLiveSet(time=time, values=tuple(values), step_bytes=step_bytes, updated=updated)


# The theoretical memory's terms, and what of a train step's live set each holds.
TERMS = ("weights", "weights held twice", "gradients", "optimizer state",
         "forward activations", "memory state", "BatchNorm running statistics",
         "training batch", "scratch", "other")


def value_terms(live: PeakLiveSet) -> list[tuple[LiveValue, str]]:
    """Each of a train step's live values at its peak with its term (one of `TERMS`).

    The step's arguments are named as `jax.jit` names a ``train_step(state,
    memory, x, y, ...)``'s (``state_params__...``, ``state_batch_stats__...``,
    ``state_opt_state__...``, ``memory_...``). Weights count once each; a
    second value of the same weight (its old value, still read after its
    update was written into the donated buffer) is "weights held twice".
    Gradients are backward values (``op_name`` under ``transpose(``) with an
    updated weight's dimensions in any order; other backward values are
    scratch (activation gradients, transposed copies), as are the values XLA
    makes without a JAX op (reversed or re-laid-out copies of weights and
    activations); forward values still live (``jvp(`` outside ``transpose(``)
    are the activations the backward pass reads.
    """
    weight_dims = {tuple(sorted(dims)) for name, dims in live.updated.items()
                   if name.startswith("state_params") and dims is not None}
    seen, out = set(), []
    for v in live.values:
        p = v.parameter
        if p is not None and p.startswith("state_params"):
            term = "weights held twice" if p in seen else "weights"
            seen.add(p)
        elif p is not None:
            term = ("optimizer state" if p.startswith("state_opt_state") else
                    "BatchNorm running statistics" if p.startswith("state_batch_stats") else
                    "memory state" if p.startswith("memory") else
                    "other" if p.startswith("state_") else "training batch")
        elif "transpose(" in v.op_name:
            grad = v.shape is not None and tuple(sorted(v.shape)) in weight_dims
            term = "gradients" if grad else "scratch"
        elif "jvp(" in v.op_name:
            term = "forward activations"
        elif not v.op_name:
            term = "scratch"
        else:
            term = "other"
        out.append((v, term))
    return out


def train_step_terms(live: PeakLiveSet) -> dict[str, int]:
    """A train step's live set at its peak in bytes per term (`TERMS`, see `value_terms`),
    plus ``packing`` (`PeakLiveSet.packing_bytes`): together, the step's bytes."""
    terms = dict.fromkeys(TERMS, 0)
    for v, term in value_terms(live):
        terms[term] += v.bytes
    terms["packing"] = live.packing_bytes
    return terms
