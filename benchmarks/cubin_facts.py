"""Facts read from a compiled kernel's artefacts (cubin, PTX) with the CUDA tools triton
bundles: registers and local memory per thread, and the hot loop's instructions.

The hot loop is found in the SASS (``cuobjdump -sass``): a loop is the range from a branch
target back to a branch that jumps up to it; the hot loop is the one that loads the most
bytes from global memory (the kernels' full-block loops; the masked tail is not a loop).
Instructions per element = the loop's instructions / the elements its loads bring in.
Besides the loads and stores, the loop's opcode families show the histogram's cost: shared
atomics (``ATOMS``), warp votes (``VOTE``) and barriers (``BAR``) per iteration. Outside
every loop, the predicated (masked) global loads show how the tail is read.
"""
from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import NamedTuple

# "/*0a40*/  @!P0 LDG.E.128 R4, desc[UR4][R2.64] ;"
_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_BRANCH_TARGET = re.compile(r"`?\(?(\.L_x_\d+)\)?|^\s*(0x[0-9a-f]+)")
_LOAD_BYTES = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


def cuobjdump(*args: str) -> str:
    """The bundled cuobjdump's output (it reads any SASS version triton emits)."""
    from triton import knobs

    result = subprocess.run([knobs.nvidia.cuobjdump.path, *args], capture_output=True,
                            text=True, check=True)
    return result.stdout


class Instruction(NamedTuple):
    address: int
    opcode: str  # with its modifiers: "LDG.E.128"
    operands: str
    predicated: bool  # under a guard predicate ("@P0"): a masked access


@dataclass
class ResourceUsage:
    registers: int
    stack_bytes: int  # per thread; spills live here
    local_bytes: int  # per thread
    shared_bytes: int  # static shared memory per CTA

    @property
    def spills(self) -> bool:
        return self.stack_bytes > 0 or self.local_bytes > 0


@dataclass
class HotLoop:
    instructions: int
    loads: dict[str, int]  # global-load opcode -> count in the loop
    stores: dict[str, int]  # global-store opcode -> count
    bytes_loaded: int
    opcodes: dict[str, int]  # opcode family (before the first dot) -> count

    def elements(self, element_bytes: int) -> float:
        return self.bytes_loaded / element_bytes

    def instructions_per_element(self, element_bytes: int) -> float:
        return self.instructions / self.elements(element_bytes)

    @property
    def all_loads_128_bit(self) -> bool:
        return bool(self.loads) and all(load_bytes(op) == 16 for op in self.loads)

    @property
    def all_stores_128_bit(self) -> bool:
        return bool(self.stores) and all(load_bytes(op) == 16 for op in self.stores)


def load_bytes(opcode: str) -> int:
    """Bytes one thread moves with a global load/store opcode (LDG.E.128 -> 16, LDG.E -> 4)."""
    for part in opcode.split(".")[1:]:
        if part in _LOAD_BYTES:
            return _LOAD_BYTES[part]
    return 4


def resource_usage(cubin_path: str) -> ResourceUsage:
    text = cuobjdump("--dump-resource-usage", cubin_path)
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return ResourceUsage(int(fields["REG"]), int(fields["STACK"]), int(fields["LOCAL"]),
                         int(fields["SHARED"]))


def _parse_sass(text: str) -> tuple[list[Instruction], dict[str, int]]:
    instructions, labels, pending = [], {}, []
    for line in text.splitlines():
        label = _LABEL.match(line)
        if label:
            pending.append(label.group(1))
            continue
        match = _INSTRUCTION.search(line)
        if match:
            address = int(match.group(1), 16)
            labels.update((name, address) for name in pending)
            pending = []
            instructions.append(Instruction(address, match.group(3), match.group(4),
                                            match.group(2) is not None))
    return instructions, labels


def loops(sass: str) -> list[list[Instruction]]:
    """Every backward-branch range in the SASS, as its instructions."""
    instructions, labels = _parse_sass(sass)
    return _loops(instructions, labels)


def _loops(instructions: list[Instruction], labels: dict[str, int]) -> list[list[Instruction]]:
    found = []
    for address, opcode, operands, _ in instructions:
        if not opcode.startswith("BRA"):
            continue
        target = _BRANCH_TARGET.search(operands.strip())
        if target is None:
            continue
        start = labels.get(target.group(1)) if target.group(1) else int(target.group(2), 16)
        if start is not None and start < address:
            found.append([i for i in instructions if start <= i.address <= address])
    return found


def hot_loop(sass: str) -> HotLoop | None:
    """The loop that loads the most bytes from global memory; None if no loop loads."""
    best = None
    for body in loops(sass):
        loads = collections.Counter(i.opcode for i in body if i.opcode.startswith("LDG"))
        nbytes = sum(load_bytes(op) * count for op, count in loads.items())
        if nbytes and (best is None or nbytes > best.bytes_loaded):
            best = HotLoop(
                instructions=len(body), loads=dict(loads),
                stores=dict(collections.Counter(i.opcode for i in body
                                                if i.opcode.startswith("STG"))),
                bytes_loaded=nbytes,
                opcodes=dict(collections.Counter(i.opcode.split(".")[0] for i in body)))
    return best


def masked_loads_outside_loops(sass: str) -> dict[str, int]:
    """Predicated global loads outside every loop, by opcode: the kernels' masked tail and
    edges (``LDG.E.128`` under a predicate: a tail read in whole vectors)."""
    instructions, labels = _parse_sass(sass)
    in_loops = {i.address for body in _loops(instructions, labels) for i in body}
    return dict(collections.Counter(
        i.opcode for i in instructions
        if i.predicated and i.opcode.startswith("LDG") and i.address not in in_loops))


def ptx_header(ptx: str) -> dict[str, str]:
    """The PTX ISA version and target the PTX was written for (``.version 9.4``)."""
    version = re.search(r"^\s*\.version\s+(\S+)", ptx, re.M)
    target = re.search(r"^\s*\.target\s+(\S+)", ptx, re.M)
    return {"ptx_isa": version.group(1) if version else "?",
            "ptx_target": target.group(1).rstrip(",") if target else "?"}


def cubin_elf_abi(cubin: bytes) -> int:
    """The cubin's ELF ABI version (``e_ident[EI_ABIVERSION]``): 7 up to CUDA 12, 8 for the
    cubin format CUDA 13 introduced, which only a CUDA 13 driver loads."""
    return cubin[8]


def cubin_facts(cubin: bytes) -> tuple[ResourceUsage, str]:
    """Resource usage and SASS text of one cubin (written to a temporary file for the tool)."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as file:
            file.write(cubin)
        return resource_usage(path), cuobjdump("-sass", path)
