"""Compiles one of PeftServe's kernel files to an sm_90 CUBIN with a local NVRTC, as KernelModule does on the GPU
machine (its .cuh includes pasted in, --std=c++17, the -D constants given; not -lineinfo, which crashes NVRTC 11.8 on
nf4.cu), so that its SASS can be read on a machine without a GPU (sass-local.sh). Usage: nvrtc_compile.py LIBNVRTC KERNEL_DIR FILE OUT.cubin [NAME=VALUE ...]"""
import ctypes
import os
import re
import sys

lib_path, kernel_dir, name, out = sys.argv[1:5]
defines = sys.argv[5:]


def paste(file, seen):
    text = open(os.path.join(kernel_dir, file)).read()

    def include(m):
        inc = m.group(1)
        if inc in seen:
            return ""
        seen.add(inc)
        return paste(inc, seen)
    return re.sub(r'^[ \t]*#include "([A-Za-z0-9_]+\.cuh)"[ \t]*$', include, text, flags=re.M)


nvrtc = ctypes.CDLL(lib_path)
P, S = ctypes.c_void_p, ctypes.c_size_t
nvrtc.nvrtcCreateProgram.argtypes = [ctypes.POINTER(P), ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int, P, P]
nvrtc.nvrtcCompileProgram.argtypes = [P, ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
for f in ("nvrtcGetProgramLogSize", "nvrtcGetCUBINSize"):
    getattr(nvrtc, f).argtypes = [P, ctypes.POINTER(S)]
for f in ("nvrtcGetProgramLog", "nvrtcGetCUBIN"):
    getattr(nvrtc, f).argtypes = [P, ctypes.c_char_p]

program = P()
if nvrtc.nvrtcCreateProgram(ctypes.byref(program), paste(name, set()).encode(), name.encode(), 0, None, None) != 0:
    sys.exit(f"nvrtcCreateProgram failed for {name}")
options = ["--gpu-architecture=sm_90", "--std=c++17"] + ["-D" + d for d in defines]
status = nvrtc.nvrtcCompileProgram(program, len(options), (ctypes.c_char_p * len(options))(*[o.encode() for o in options]))
size = S()
nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
log = ctypes.create_string_buffer(size.value)
nvrtc.nvrtcGetProgramLog(program, log)
if status != 0:
    sys.exit(f"{name} {' '.join(defines)}: NVRTC error {status}\n{log.value.decode(errors='replace')}")
nvrtc.nvrtcGetCUBINSize(program, ctypes.byref(size))
image = ctypes.create_string_buffer(size.value)
nvrtc.nvrtcGetCUBIN(program, image)
with open(out, "wb") as f:
    f.write(image.raw)
