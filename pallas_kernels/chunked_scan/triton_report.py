"""Compile the GPU kernels without a GPU and report their resources (registers, spills, shared memory,
HGMMA count) for sm_90, to catch Triton compile failures and local-memory spills before a device run.

Step 1 (this environment's jax, CPU is enough): lower forward+backward for per-dimension and per-head gates,
bf16 and fp32, to Triton IR, one ``.ttir`` per kernel plus ``launch.json`` (num_warps, num_stages).
Step 2 (a Python with the ``triton`` package, e.g. a venv with ``pip install triton==3.6.0``, the GPU image's
version; it bundles ptxas and cuobjdump): compile each for sm_90 and print the table. jax's bundled Triton is
not pip's, so the numbers are a close proxy, not the device's own.

    python -m pallas_kernels.chunked_scan.triton_report --dump /tmp/ttir [--dk 128 --dv 128]
    /path/to/venv/bin/python -m pallas_kernels.chunked_scan.triton_report --compile /tmp/ttir
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys


def dump(out: str, dk: int, dv: int, seq: int = 1024) -> None:
    import jax
    import jax.numpy as jnp
    from jax._src.pallas.triton import pallas_call_registration as registration

    from pallas_kernels.chunked_scan import gla

    os.makedirs(out, exist_ok=True)
    modules = []
    lower = registration.lowering.lower_jaxpr_to_triton_module

    def capture(jaxpr, *args, **kwargs):
        result = lower(jaxpr, *args, **kwargs)
        modules.append((jaxpr.debug_info.func_name, result.module.operation.get_asm(enable_debug_info=False)))
        return result

    registration.lowering.lower_jaxpr_to_triton_module = capture
    launch = {}
    try:
        for per_head in (False, True):
            for dtype in (jnp.bfloat16, jnp.float32):
                q = jax.ShapeDtypeStruct((2, seq, 2, dk), dtype)
                v = jax.ShapeDtypeStruct((2, seq, 2, dv), dtype)
                g = jax.ShapeDtypeStruct((2, seq, 2, 1 if per_head else dk), dtype)

                def fwd_bwd(q, k, v, g, do):
                    o, vjp = jax.vjp(lambda *a: gla(*a, backend="gpu"), q, k, v, g)
                    return o, vjp(do)

                del modules[:]
                text = jax.jit(fwd_bwd).trace(q, q, v, g, v).lower(lowering_platforms=("cuda",)).as_text()
                params = re.findall(r'name = "(\w+)", num_stages = (\d+) : i32, num_warps = (\d+) : i32', text)
                params = {name: (int(stages), int(warps)) for name, stages, warps in params}
                tag = f"{'head' if per_head else 'dim'}_{jnp.dtype(dtype).name}"
                for name, asm in dict(modules).items():  # the recomputed state pass appears twice
                    path = f"{name}_{tag}.ttir"
                    with open(os.path.join(out, path), "w") as f:
                        f.write(asm)
                    stages, warps = params.get(name, (1, 4))
                    launch[path] = {"num_warps": warps, "num_stages": stages}
    finally:
        registration.lowering.lower_jaxpr_to_triton_module = lower
    with open(os.path.join(out, "launch.json"), "w") as f:
        json.dump(launch, f, indent=1)
    print(f"wrote {len(launch)} kernels to {out}")


def compile_report(folder: str) -> int:
    import triton
    from triton.backends.compiler import GPUTarget

    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with open(os.path.join(folder, "launch.json")) as f:
        launch = json.load(f)
    failed = 0
    print(f"triton {triton.__version__}, sm_90")
    print("| kernel | warps | stages | regs | stack B | shared KB | HGMMA | LDL/STL |")
    print("|---|---|---|---|---|---|---|---|")
    for path, opts in sorted(launch.items()):
        try:
            kernel = triton.compile(os.path.join(folder, path), target=GPUTarget("cuda", 90, 32), options=opts)
        except Exception as e:  # report every kernel
            failed += 1
            print(f"| {path} | {opts['num_warps']} | {opts['num_stages']} | FAIL {type(e).__name__} | | | | |")
            continue
        cubin = os.path.join(folder, path.replace(".ttir", ".cubin"))
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-resource-usage", cubin],
                               capture_output=True, text=True).stdout
        regs, stack = re.search(r"REG:(\d+).*STACK:(\d+)", usage).groups()
        sass = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-sass", cubin],
                              capture_output=True, text=True).stdout
        print(f"| {path[:-5]} | {opts['num_warps']} | {opts['num_stages']} | {regs} | {stack} | "
              f"{kernel.metadata.shared // 1024} | {sass.count('HGMMA')} | {sass.count('LDL')}/{sass.count('STL')} |")
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dump", metavar="DIR", help="step 1: write the kernels' Triton IR to DIR")
    parser.add_argument("--compile", metavar="DIR", help="step 2: compile DIR's kernels for sm_90, report")
    parser.add_argument("--dk", type=int, default=128)
    parser.add_argument("--dv", type=int, default=128)
    args = parser.parse_args(argv)
    if args.dump:
        dump(args.dump, args.dk, args.dv)
    if args.compile:
        return compile_report(args.compile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
