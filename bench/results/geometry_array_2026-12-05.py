"""The same kernel source compiled with its geometry typed as a tuple of ints (kernel parameters, what cnnfast passes)
and as an int64 array (one pointer; the values loaded from global memory): kernel parameters, registers, spills and
the innermost FMA loop's SASS (instructions, FMAs, branches), sm_90, no GPU (RESULTS.md, 2026-12-05).

    NUMBA_ENABLE_CUDASIM=0 python bench/results/geometry_array_2026-12-05.py NAME [NAME ...]

NAME: rows of compile.specialisations(), e.g. "direct_forward/128x128[float32,array]" (needs nvdisasm for the SASS:
pip install nvidia-cuda-nvdisasm).
"""
import json
import sys

from cnnfast.kernels.cuda.compile import compile_ptx, specialisations
from cnnfast.kernels.cuda.ptx import CC, link_report, ptx_facts
from numba import types

for name, pyfunc, argtypes, _typing in (s for s in specialisations() if s[0] in sys.argv[1:]):
    for geometry in ("tuple", "array"):
        typed = tuple(types.int64[::1] if geometry == "array" and isinstance(t, types.UniTuple) else t
                      for t in argtypes)
        try:
            ptx = compile_ptx(pyfunc, typed, CC)
        except Exception as e:  # a kernel that uses the geometry as a tuple (concatenates it, ...)
            print(json.dumps({"name": name, "geometry": geometry, "error": type(e).__name__}), flush=True)
            continue
        facts, report = ptx_facts(ptx), link_report(ptx)
        print(json.dumps({"name": name, "geometry": geometry, "params": facts["params"],
                          "registers": report["registers"], "spills": [report["spill_stores"], report["spill_loads"]],
                          "sass_loop": report["sass_loop"], "max_threads": facts["max_threads"]}), flush=True)
