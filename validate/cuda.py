"""CUDA for the TensorRT runner: device count, device memory and a stream through cuda-python (runtime API)
or pycuda. **No torch**; both packages are imported lazily."""

from __future__ import annotations

import numpy as np

from rdcd.errors import RdcdError


def _cudart():
    """cuda-python's runtime API module, or ``None`` when cuda-python is not installed."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError:
            return None
    return cudart


def cuda_devices() -> tuple[int, str]:
    """(number of CUDA devices, why none) through cuda-python or pycuda; never imports torch."""
    cudart = _cudart()
    if cudart is not None:
        try:
            err, count = cudart.cudaGetDeviceCount()
        except Exception as exc:  # a broken CUDA install
            return 0, f"CUDA runtime unusable: {exc}"
        if err != cudart.cudaError_t.cudaSuccess:
            return 0, _cudart_error(cudart, err)
        return int(count), "" if count else "no CUDA device"
    try:
        import pycuda.driver as pcuda
    except ImportError:
        return 0, "neither cuda-python nor pycuda is installed"
    try:
        pcuda.init()
        count = pcuda.Device.count()
    except Exception as exc:
        return 0, f"CUDA driver: {str(exc).splitlines()[0]}"
    return int(count), "" if count else "no CUDA device"


def _cudart_error(cudart, err) -> str:
    try:
        msg = cudart.cudaGetErrorString(err)[1]
        msg = msg.decode() if isinstance(msg, bytes) else str(msg)
    except Exception:
        msg = ""
    name = getattr(err, "name", str(err))
    return f"{name}: {msg}" if msg else name


class _CudaRT:
    """Device memory and a stream through cuda-python's runtime API."""

    def __init__(self, cudart):
        self.rt = cudart
        self.stream = self._call(cudart.cudaStreamCreate())

    def _call(self, res):
        err, *rest = res if isinstance(res, tuple) else (res,)
        if err != self.rt.cudaError_t.cudaSuccess:
            raise RdcdError(f"CUDA error {_cudart_error(self.rt, err)}")
        return rest[0] if len(rest) == 1 else (rest or None)

    def malloc(self, nbytes: int) -> int:
        return int(self._call(self.rt.cudaMalloc(max(int(nbytes), 1))))

    def free(self, ptr: int) -> None:
        self._call(self.rt.cudaFree(ptr))

    def htod(self, ptr: int, host: np.ndarray) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call(self.rt.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes, kind, self.stream))

    def dtoh(self, host: np.ndarray, ptr: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call(self.rt.cudaMemcpyAsync(host.ctypes.data, ptr, host.nbytes, kind, self.stream))

    @property
    def stream_handle(self) -> int:
        return int(self.stream)

    def synchronize(self) -> None:
        self._call(self.rt.cudaStreamSynchronize(self.stream))

    def close(self) -> None:
        self.rt.cudaStreamDestroy(self.stream)


class _PyCuda:
    """The same through pycuda (its primary context on device 0)."""

    def __init__(self, pcuda):
        self.cuda = pcuda
        pcuda.init()
        self.ctx = pcuda.Device(0).retain_primary_context()
        self.ctx.push()
        self.stream = pcuda.Stream()
        self._allocs: dict[int, object] = {}

    def malloc(self, nbytes: int) -> int:
        alloc = self.cuda.mem_alloc(max(int(nbytes), 1))
        self._allocs[int(alloc)] = alloc
        return int(alloc)

    def free(self, ptr: int) -> None:
        alloc = self._allocs.pop(ptr, None)
        if alloc is not None:
            alloc.free()

    def htod(self, ptr: int, host: np.ndarray) -> None:
        self.cuda.memcpy_htod(ptr, host)  # pageable host memory: synchronous copies

    def dtoh(self, host: np.ndarray, ptr: int) -> None:
        self.stream.synchronize()
        self.cuda.memcpy_dtoh(host, ptr)

    @property
    def stream_handle(self) -> int:
        return int(self.stream.handle)

    def synchronize(self) -> None:
        self.stream.synchronize()

    def close(self) -> None:
        try:
            self.ctx.pop()
        except Exception:
            pass


def cuda_backend():
    """Device memory and a stream for a TensorRT runner: cuda-python, else pycuda; raises
    :class:`RuntimeUnavailable` without a usable GPU."""
    count, why = cuda_devices()
    if not count:
        from rdcd.errors import RuntimeUnavailable

        raise RuntimeUnavailable(f"no NVIDIA GPU usable here ({why})")
    cudart = _cudart()
    if cudart is not None:
        return _CudaRT(cudart)
    import pycuda.driver as pcuda

    return _PyCuda(pcuda)
