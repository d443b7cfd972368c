"""lower/aoti_pdl.py on the CPU: the launchKernel helper it gives AOTInductor's C++ wrapper is compiled (g++, against
the CUDA driver API headers triton carries) with stand-ins for the driver calls, and run: Inductor's own kernels
must take cuLaunchKernelEx with programmatic stream serialization and the launch's own grid, block and shared
memory; template and user kernels, the plain cuLaunchKernel."""
import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest

from tpcompile.lower import aoti_pdl

HEADERS = (Path(importlib.util.find_spec("triton").origin).parent / "backends" / "nvidia" / "include"
           if importlib.util.find_spec("triton") else None)

STAND_INS = r"""
#include <cstdio>
static const char* stand_in_name = "";
static int plain = 0, ex = 0;
static CUlaunchConfig seen = {};
static CUlaunchAttribute seen_attribute = {};
CUresult cuGetErrorString(CUresult, const char** s) { *s = "stand-in"; return CUDA_SUCCESS; }
CUresult cuFuncGetName(const char** name, CUfunction) { *name = stand_in_name; return CUDA_SUCCESS; }
CUresult cuLaunchKernel(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, CUstream,
                        void**, void**) { ++plain; return CUDA_SUCCESS; }
CUresult cuLaunchKernelEx(const CUlaunchConfig* c, CUfunction, void**, void**) {
    ++ex; seen = *c; seen_attribute = c->attrs[0]; return CUDA_SUCCESS;
}
int main(int argc, char** argv) {
    stand_in_name = argv[1];
    launchKernel(nullptr, 3, 2, 1, 4, 128, nullptr, nullptr);  // grid (3, 2, 1), 4 warps, 128 bytes of shared memory
    printf("%d %d %u %u %u %u %u %u %u %d %d\n", plain, ex, seen.gridDimX, seen.gridDimY, seen.gridDimZ,
           seen.blockDimX, seen.blockDimY, seen.sharedMemBytes, seen.numAttrs, (int)seen_attribute.id,
           seen_attribute.value.programmaticStreamSerializationAllowed);
}
"""


@pytest.mark.skipif(shutil.which("g++") is None or HEADERS is None or not (HEADERS / "cuda.h").is_file(),
                    reason="needs g++ and the CUDA headers triton carries")
def test_inductor_kernels_launch_with_the_attribute_and_the_rest_as_before(tmp_path):
    driver = aoti_pdl.check()  # this torch's helpers, patched
    assert driver.count("cuLaunchKernelEx(") == 1 and driver.count("cuLaunchKernel(") == 1
    source = tmp_path / "driver.cpp"
    source.write_text("".join(f"#include <{h}>\n" for h in ("cuda.h", "cuda_runtime_api.h", "filesystem", "optional",
                                                            "stdexcept", "string", "vector"))
                      + driver + STAND_INS)
    built = subprocess.run(["g++", "-std=c++17", f"-I{HEADERS}", str(source), "-o", str(tmp_path / "driver")],
                           capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr[-3000:]

    def launch(name: str) -> list[int]:
        ran = subprocess.run([str(tmp_path / "driver"), name], capture_output=True, text=True, timeout=30)
        assert ran.returncode == 0, ran.stderr
        return [int(x) for x in ran.stdout.split()]

    # the attribute's value as cuda.h defines it: "CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6"
    enum = (HEADERS / "cuda.h").read_text().split("CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION")[1]
    attribute = int(enum.split("=")[1].split()[0])
    for name in ("triton_poi_fused_add_0", "triton_red_fused_mm_1", "triton_per_fused_rms_norm_2"):
        assert launch(name) == [0, 1, 3, 2, 1, 4 * 32, 1, 128, 1, attribute, 1], name
    for name in ("triton_tem_fused_mm_3", "_split_kernel", ""):
        assert launch(name)[:2] == [1, 0], name


def test_an_unknown_wrapper_is_one_clear_error():
    with pytest.raises(ValueError, match=r"launches its kernels in 0 places .* drop the setting"):
        aoti_pdl.launch_with_pdl("static inline void launchKernel() { cuLaunchKernelEx(...); }")
