"""What every kernel's ``triton_report`` shares: lower Pallas Triton kernels for CUDA without a GPU (step 1),
compile them for sm_90 with pip's ``triton`` and report their resources (step 2).

Step 1 runs in this environment's jax (CPU is enough) and writes one ``.ttir`` per kernel plus ``launch.json``
(num_warps, num_stages). Step 2 runs in a Python with the ``triton`` package (e.g. a venv with
``pip install triton==3.6.0``, the GPU image's version; it bundles ptxas and cuobjdump) and prints registers,
stack (spills), shared memory, HGMMA count, spill loads/stores, instructions per loop and blocks per SM; exit
status 1 if a kernel fails to compile or does not fit an SM. jax's bundled Triton is not pip's, so the numbers
are a close proxy, not the device's own. Each kernel folder's ``triton_report.py`` says what it lowers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
from typing import Callable

SHARED_LIMIT = 227 * 1024  # per block on sm_90
REGISTERS, SHARED_PER_SM = 65536, 228 * 1024
PALLAS_DEFAULT_LAUNCH = (1, 4)  # (num_stages, num_warps) when the lowering does not name them


@contextlib.contextmanager
def capture_triton(modules: list):
    """Append ``(kernel name, Triton IR text)`` to ``modules`` for every Pallas Triton kernel lowered inside."""
    from jax._src.pallas.triton import pallas_call_registration as registration

    lower = registration.lowering.lower_jaxpr_to_triton_module

    def capture(jaxpr, *args, **kwargs):
        result = lower(jaxpr, *args, **kwargs)
        modules.append((jaxpr.debug_info.func_name, result.module.operation.get_asm(enable_debug_info=False)))
        return result

    registration.lowering.lower_jaxpr_to_triton_module = capture
    try:
        yield modules
    finally:
        registration.lowering.lower_jaxpr_to_triton_module = lower


def lower_for_cuda(fn: Callable, *args) -> dict[str, tuple[str, int, int]]:
    """Lower ``jax.jit(fn)`` at ``args`` (arrays or ShapeDtypeStructs) for CUDA, without a GPU ->
    {kernel name: (Triton IR, num_stages, num_warps)}; a kernel lowered twice (a recomputed pass) counts once."""
    import jax

    modules = []
    with capture_triton(modules):
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    params = re.findall(r'name = "(\w+)", num_stages = (\d+) : i32, num_warps = (\d+) : i32', text)
    params = {name: (int(stages), int(warps)) for name, stages, warps in params}
    return {name: (asm, *params.get(name, PALLAS_DEFAULT_LAUNCH)) for name, asm in dict(modules).items()}


def write_kernels(out: str, kernels: dict[str, tuple[str, int, int]]) -> None:
    """Step 1's output: {file name ending in .ttir: (Triton IR, num_stages, num_warps)} -> files + launch.json."""
    os.makedirs(out, exist_ok=True)
    launch = {}
    for path, (asm, stages, warps) in kernels.items():
        with open(os.path.join(out, path), "w") as f:
            f.write(asm)
        launch[path] = {"num_warps": warps, "num_stages": stages}
    with open(os.path.join(out, "launch.json"), "w") as f:
        json.dump(launch, f, indent=1)
    print(f"wrote {len(launch)} kernels to {out}")


def _loops(sass: str) -> list[int]:
    """Instruction counts of the SASS loops (backward branches), in address order."""
    ins = [(int(a, 16), t) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    sizes = []
    for addr, text in ins:
        m = re.search(r"BRA\s.*?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            sizes.append(sum(1 for a, _ in ins if int(m.group(1), 16) <= a <= addr))
    return sizes


def _make_ttir(folder: str, path: str, opts: dict) -> str:
    """Run Triton's TTIR passes (canonicalize, combine (dot + add -> dot with accumulator), CSE, ...) on the
    lowered IR, as XLA's Triton pipeline does on the device; ``triton.compile`` skips them for an IR file."""
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", 90, 32))
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = ir.parse_mlir_module(os.path.join(folder, path), context)
    module.context = context
    backend.make_ttir(module, {}, backend.parse_options(opts), 90)
    out = os.path.join(folder, path[:-5] + ".opt.ttir")
    with open(out, "w") as f:
        f.write(str(module))
    return out


def compile_report(folder: str, sass_files: bool = False) -> int:
    """Step 2: compile every kernel in ``folder`` for sm_90 and print registers, stack (spills), shared memory,
    HGMMA count, spill loads/stores, instructions per loop, and blocks per SM (0: does not fit)."""
    import triton
    from triton.backends.compiler import GPUTarget

    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with open(os.path.join(folder, "launch.json")) as f:
        launch = json.load(f)
    failed = 0
    print(f"triton {triton.__version__}, sm_90")
    print("| kernel | warps | stages | regs | stack B | shared KB | HGMMA | LDL/STL | loop instrs | blocks/SM |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for path, opts in sorted(launch.items()):
        name = path[:-5]
        try:
            kernel = triton.compile(_make_ttir(folder, path, opts), target=GPUTarget("cuda", 90, 32),
                                    options=opts)
        except Exception as e:  # report every kernel
            failed += 1
            print(f"| {name} | {opts['num_warps']} | {opts['num_stages']} | FAIL {type(e).__name__} | | | | | | |")
            continue
        base = os.path.join(folder, name)
        with open(base + ".cubin", "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-resource-usage", base + ".cubin"],
                               capture_output=True, text=True).stdout
        regs, stack = (int(x) for x in re.search(r"REG:(\d+).*STACK:(\d+)", usage).groups())
        sass = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-sass", base + ".cubin"],
                              capture_output=True, text=True).stdout
        if sass_files:
            with open(base + ".sass", "w") as f:
                f.write(sass)
            with open(base + ".ttgir", "w") as f:
                f.write(kernel.asm["ttgir"])
        shared = kernel.metadata.shared
        threads = 32 * opts["num_warps"]
        blocks = 0 if shared > SHARED_LIMIT else min(REGISTERS // (max(regs, 1) * threads),
                                                      SHARED_PER_SM // (shared + 1024))
        failed += blocks == 0
        print(f"| {name} | {opts['num_warps']} | {opts['num_stages']} | {regs} | {stack} | {shared // 1024} | "
              f"{sass.count('HGMMA')} | {sass.count('LDL')}/{sass.count('STL')} | "
              f"{'/'.join(map(str, _loops(sass)))} | {blocks} |")
    return 1 if failed else 0


def main(argv, description: str, dump: Callable[[argparse.Namespace], None],
         add_options: Callable[[argparse.ArgumentParser], None] = lambda parser: None) -> int:
    """A kernel report's command line: --dump DIR calls ``dump(args)`` (step 1), --compile DIR step 2;
    ``add_options`` adds the kernel's own step-1 flags."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dump", metavar="DIR", help="step 1: write the kernels' Triton IR to DIR")
    parser.add_argument("--compile", metavar="DIR", help="step 2: compile DIR's kernels for sm_90, report")
    parser.add_argument("--sass", action="store_true", help="with --compile: also write .ttgir and .sass")
    add_options(parser)
    args = parser.parse_args(argv)
    if args.dump:
        dump(args)
    if args.compile:
        return compile_report(args.compile, args.sass)
    return 0
