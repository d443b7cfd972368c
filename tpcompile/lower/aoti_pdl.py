"""Programmatic dependent launch for AOTInductor packages: asked for with the Inductor setting triton.enable_pdl
on an aoti backend (TPCOMPILE_INDUCTOR_OPTIONS='{"triton.enable_pdl": true}'; off by default there).

Measured on one H200 (torch 2.11, llama_8b's layers cut to 8, aoti_cudagraphs, one call): 1.316 ms/token with it,
1.317 without. The GPU is busy for the whole of such a step (a CUDA graph of kernels back to back), so there is no
launch gap for it to hide; the packages did carry the attributed launch and the kernels' waits
(benchmarks/notes/2026-11-29.md).

With triton.enable_pdl, Inductor writes into each kernel it generates a wait (griddepcontrol.wait) before the
first read of what the kernel before it wrote, and after its loads the signal that lets the next kernel launch.
torch.compile's launcher then launches those kernels with the launch attribute; AOTInductor's C++ wrapper does
not: its launchKernel helper is a plain cuLaunchKernel (torch 2.11 to 2.13), so the waits are there and the gain
is not. install() makes the helper launch Inductor's own kernels with the attribute, as torch.compile does:

    before: cuLaunchKernel(func, grid..., 32 * numWarps, ..., stream, args, nullptr)
    after:  if func's name starts with one of PDL_KERNELS:
                cuLaunchKernelEx(config with CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 1, func, args)
            else: the plain launch

Template kernels (triton_tem_) and user kernels (ours in kernels/) carry no wait, so they launch as before:
a kernel without the wait must not start before the one it follows has finished.
Runs only in the AOTInductor compile subprocess (lower/aoti.py), which it leaves patched until it exits.
"""
import re

PDL_KERNELS = ("triton_poi_", "triton_red_", "triton_per_")  # Inductor's pointwise, reduction, persistent kernels

PLAIN_LAUNCH = re.compile(r"CUDA_DRIVER_CHECK\(cuLaunchKernel\(\s*func, gridX, gridY, gridZ, 32\*numWarps, 1, 1, "
                          r"sharedMemBytes, stream, args, nullptr\s*\)\);")

PDL_LAUNCH = """{{
                const char* kernel_name = nullptr;
                const bool pdl = cuFuncGetName(&kernel_name, func) == CUDA_SUCCESS && kernel_name != nullptr
                                 && ({prefixes});
                if (pdl) {{
                    CUlaunchAttribute attribute[1];
                    attribute[0].id = CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
                    attribute[0].value.programmaticStreamSerializationAllowed = 1;
                    CUlaunchConfig config = {{}};
                    config.gridDimX = gridX;
                    config.gridDimY = gridY;
                    config.gridDimZ = gridZ;
                    config.blockDimX = 32*numWarps;
                    config.blockDimY = 1;
                    config.blockDimZ = 1;
                    config.sharedMemBytes = sharedMemBytes;
                    config.hStream = stream;
                    config.attrs = attribute;
                    config.numAttrs = 1;
                    CUDA_DRIVER_CHECK(cuLaunchKernelEx(&config, func, args, nullptr));
                }} else {{
                    {plain}
                }}
            }}"""


def launch_with_pdl(driver: str) -> str:
    """AOTInductor's C++ kernel helpers (the text of `kernel_driver()`) with launchKernel as above."""
    found = PLAIN_LAUNCH.findall(driver)
    if len(found) != 1:
        import torch
        raise ValueError(f"triton.enable_pdl with an aoti backend: torch {torch.__version__}'s AOTInductor launches "
                         f"its kernels in {len(found)} places this code knows (wants 1, as in torch 2.11-2.13); "
                         f"drop the setting from TPCOMPILE_INDUCTOR_OPTIONS")
    prefixes = " || ".join(f'std::string(kernel_name).rfind("{p}", 0) == 0' for p in PDL_KERNELS)
    return PLAIN_LAUNCH.sub(lambda m: PDL_LAUNCH.format(prefixes=prefixes, plain=m.group(0)), driver)


def check() -> str:
    """This torch's helpers as install() makes them; ValueError when it does not know them."""
    from torch._inductor.codegen.cuda.device_op_overrides import CUDADeviceOpOverrides
    return launch_with_pdl(CUDADeviceOpOverrides().kernel_driver())


def install() -> None:
    """From now on in this process, AOTInductor's CUDA wrappers launch Inductor's kernels with the attribute."""
    from torch._inductor.codegen.cuda.device_op_overrides import CUDADeviceOpOverrides
    check()
    plain = CUDADeviceOpOverrides.kernel_driver
    CUDADeviceOpOverrides.kernel_driver = lambda self: launch_with_pdl(plain(self))
