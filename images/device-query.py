#!/usr/bin/env python3
"""device-query: list the GPUs through the CUDA driver API of this image's own libcuda, the way
NVIDIA's deviceQuery sample proved a container worked. Exit 0 with the devices listed, or non-zero
with the CUDA error name (e.g. CUDA_ERROR_NO_DEVICE)."""

import ctypes
import sys

ATTR_MAJOR, ATTR_MINOR = 75, 76  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR / _MINOR


def main() -> int:
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        print(f"device-query: cannot load libcuda.so.1: {exc}", file=sys.stderr)
        return 2

    def check(result: int, what: str) -> None:
        if result != 0:
            name = ctypes.c_char_p()
            cuda.cuGetErrorName(result, ctypes.byref(name))
            text = name.value.decode() if name.value else f"error {result}"
            raise SystemExit(f"device-query: {what} failed: {text} ({result})")

    version = ctypes.c_int()
    check(cuda.cuDriverGetVersion(ctypes.byref(version)), "cuDriverGetVersion")
    print(f"CUDA driver API {version.value // 1000}.{version.value % 1000 // 10}")
    check(cuda.cuInit(0), "cuInit")
    count = ctypes.c_int()
    check(cuda.cuDeviceGetCount(ctypes.byref(count)), "cuDeviceGetCount")
    print(f"{count.value} CUDA device(s)")
    for ordinal in range(count.value):
        device = ctypes.c_int()
        check(cuda.cuDeviceGet(ctypes.byref(device), ordinal), "cuDeviceGet")
        name = ctypes.create_string_buffer(256)
        check(cuda.cuDeviceGetName(name, 256, device), "cuDeviceGetName")
        memory = ctypes.c_size_t()
        check(cuda.cuDeviceTotalMem_v2(ctypes.byref(memory), device), "cuDeviceTotalMem")
        major, minor = ctypes.c_int(), ctypes.c_int()
        check(cuda.cuDeviceGetAttribute(ctypes.byref(major), ATTR_MAJOR, device), "cuDeviceGetAttribute")
        check(cuda.cuDeviceGetAttribute(ctypes.byref(minor), ATTR_MINOR, device), "cuDeviceGetAttribute")
        uuid = (ctypes.c_ubyte * 16)()
        check(cuda.cuDeviceGetUuid(ctypes.byref(uuid), device), "cuDeviceGetUuid")
        h = bytes(uuid).hex()
        print(f"Device {ordinal}: {name.value.decode()}, {memory.value / 1024**3:.1f} GiB, "
              f"compute capability {major.value}.{minor.value}, "
              f"UUID GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
