"""Build, cache and call the native CPU pulse kernel (sim_backend/native/pulses.cpp).

The C++ source is compiled once per machine with the system C++ compiler into a shared
library under the user cache (``$HIL_CACHE_DIR`` or ``~/.cache/analog-hil``), keyed by
a hash of the source, the flags and the compiler, and loaded with ctypes. Where no
compiler works, :func:`available` is False and the emulator keeps its torch kernels.
``HIL_NATIVE=0`` turns the native kernel off.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from sim_backend.kernels import FusedParams, operand

SOURCE = Path(__file__).with_name("native") / "pulses.cpp"
FLAGS = ["-O3", "-std=c++17", "-fPIC", "-shared", "-pthread", "-fno-math-errno",
         "-ffp-contract=off"]
OPTIONAL_FLAGS = [["-march=native", "-fopenmp"], ["-fopenmp"], []]  # tried in order
# -fopenmp links libgomp.so.1, the runtime torch's Linux wheels load: the kernel's threads
# are torch's own OpenMP workers (no second pool spinning against them); where the
# compiler has no OpenMP the kernel builds single-threaded
FAMILY_CODE = {"linear": 0, "exp": 4}
SOURCE_CODE = {torch.int8: 0, torch.int32: 1}
MIN_THREADED = 1 << 13  # device-samples (numel x batch) below which one thread does the
# work (a parallel region costs a few microseconds)
MIN_THREADED_MVM = 1 << 17  # multiply-adds below which an MVM runs on one thread
MIN_BLAS_MVM = 1 << 18  # multiply-adds from which the product runs in torch's BLAS (the
# periphery stays here): a blocked sgemm beats the kernel's row loops there

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_failed: str | None = None


def cache_dir() -> Path:
    root = os.environ.get("HIL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "analog-hil")
    return Path(root) / "native"


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") \
        or shutil.which("clang++")


def _compile(cxx: str, out: Path) -> None:
    """Compile to a temporary file and rename, so concurrent processes never load half a file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        for extra in OPTIONAL_FLAGS:
            cmd = [cxx, *FLAGS, *extra, str(SOURCE), "-o", tmp]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if proc.returncode == 0:
                os.replace(tmp, out)
                return
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip()
                           else f"{cxx} exited with {proc.returncode}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> ctypes.CDLL:
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (c++, g++ or clang++) on PATH")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256("\0".join(
        [SOURCE.read_text(), *FLAGS, *map(" ".join, OPTIONAL_FLAGS), cxx, version,
         platform.machine(),
         platform.processor()]).encode()).hexdigest()[:16]
    path = cache_dir() / f"pulses-{digest}.so"
    if not path.exists():
        _compile(cxx, path)
    lib = ctypes.CDLL(str(path))
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.hil_pulse_trains.argtypes = [p, i64, i64, i64, i64, i32, p, i32, i32, p, p, p, p, p,
                                     i64, p, i64, ctypes.c_float, ctypes.c_int32, i32, i64,
                                     i64]
    lib.hil_pulse_trains.restype = i32
    lib.hil_outer_update.argtypes = [p, i64, i64, p, p, i64, ctypes.c_double, i32, i64,
                                     ctypes.c_int32, ctypes.c_int32, i32, i32, p, p, p, p, p,
                                     i64, p, i64, ctypes.c_float, ctypes.c_int32, i32]
    lib.hil_outer_update.restype = i32
    f32 = ctypes.c_float
    lib.hil_mvm.argtypes = [p, i64, i64, i64, i32, i32, p, p, i32, ctypes.c_int32, f32, f32,
                            f32, f32, f32, p, i32]
    lib.hil_mvm.restype = None
    lib.hil_dac.argtypes = [p, i64, i64, f32, f32, p, p]
    lib.hil_dac.restype = None
    lib.hil_adc.argtypes = [p, i64, i64, i32, ctypes.c_int32, f32, f32, f32, p, i32]
    lib.hil_adc.restype = None
    lib.hil_pulse_normal.argtypes = [ctypes.c_int32, ctypes.c_int32]
    lib.hil_pulse_normal.restype = ctypes.c_float
    lib.hil_openmp.argtypes = []
    lib.hil_openmp.restype = i32
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, built on first use; None (with one warning) if it cannot be."""
    global _lib, _failed
    if _lib is not None or _failed is not None:
        return _lib
    with _lock:
        if _lib is None and _failed is None:
            if os.environ.get("HIL_NATIVE", "1") == "0":
                _failed = "HIL_NATIVE=0"
                return None
            try:
                _lib = _load()
            except Exception as exc:  # no compiler, read-only cache, foreign platform
                _failed = f"{type(exc).__name__}: {exc}"
                warnings.warn(f"native pulse kernel unavailable ({_failed}); the emulator "
                              "uses its torch kernels", RuntimeWarning, stacklevel=3)
    return _lib


def unavailable_reason() -> str | None:
    """Why the native kernel is not loaded (None when it is)."""
    library()
    return _failed


def available() -> bool:
    """True when the native kernel is built and loaded (CPU tensors only)."""
    return library() is not None


def threaded() -> bool:
    """Whether the loaded kernel was built with OpenMP (else it runs on one thread)."""
    lib = library()
    return lib is not None and bool(lib.hil_openmp())


def _require() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError(f"native pulse kernel unavailable ({_failed})")
    return lib


def _family(fp: FusedParams) -> tuple[int, float]:
    if fp.family != "power":
        return FAMILY_CODE[fp.family], math.nan
    gamma = fp.gamma
    if gamma == 0.5:
        return 1, math.nan
    if gamma == 1.0:
        return 0, math.nan
    if gamma == 2.0:
        return 2, math.nan
    return 3, (math.nan if gamma is None else float(gamma))


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def pulse_trains(w: torch.Tensor, fp: FusedParams, key: int | torch.Tensor, noisy: bool, *,
                 counts: torch.Tensor, shape: tuple[int, int] | None = None,
                 columns: tuple[int, int] | None = None) -> None:
    """Apply pulse trains to the flat float32 CPU weights ``w`` in place, device by device.

    ``counts`` [B, numel] (int8 or int32): signed pulse counts per sample. ``columns`` =
    (first, width) with ``shape`` = (rows, cols): ``counts`` [B, rows, width] hold only
    those columns (the others get no pulse; same result as the zero-padded map).
    Sample b's pulses all land before sample b+1's; the noise of a device's p-th pulse
    in this call is kernels.pulse_normal(mix(i ^ key), p), i its index in the tile.
    """
    lib = _require()
    numel = w.numel()
    _check_weights(w)
    col0, width = columns if columns is not None else (0, 0)
    rows, cols = shape if shape is not None else (1, numel)
    cnt = counts if counts.dtype in SOURCE_CODE else counts.to(torch.int32)
    cnt = cnt.reshape(-1, rows * width if width else numel).contiguous()
    _check(lib.hil_pulse_trains(
        w.data_ptr(), numel, rows, cols, cnt.shape[0], SOURCE_CODE[cnt.dtype], _ptr(cnt),
        *_device_args(fp, noisy), int(key), _threads(cnt.numel()), col0, width))


def outer_update(w: torch.Tensor, fp: FusedParams, x: torch.Tensor, d: torch.Tensor,
                 lr: float, dw_min: float, train_length: int, keys: list[int], noisy: bool,
                 key: int) -> None:
    """The whole outer update of the rows x cols tile ``w`` (float32 CPU, in place) in one
    call: the pulse trains of emulator.pulse_train_counts (the same draws: columns under
    keys[0], rows under keys[1]) as packed 31-slot fire masks, a device's count being the
    popcount of its row's and column's masks, applied device by device as
    :func:`pulse_trains` applies counts (nothing of size batch x rows x cols is built)."""
    lib = _require()
    _check_weights(w)
    rows, cols = w.shape
    x, d = _floats(x), _floats(d)
    batch = x.shape[0]
    k = abs(lr) / (dw_min * train_length)
    _check(lib.hil_outer_update(
        w.data_ptr(), rows, cols, x.data_ptr(), d.data_ptr(), batch, k, int(lr < 0),
        train_length, keys[0], keys[1], *_device_args(fp, noisy), key,
        _threads(w.numel() * batch)))


def mvm(x: torch.Tensor, terms: list[tuple[torch.Tensor, float]], transpose: bool,
        noise_key: int | None, sigma: float, inp_bound: float, inp_res: float,
        out_bound: float, out_res: float) -> torch.Tensor:
    """A whole MVM through the periphery (emulator.SimTile.mvm's ops: DAC with noise
    management, the weighted sum of the terms' float32 [rows, cols] arrays, output noise,
    ADC); x [B, n_in] -> [B, n_out]. The output noise is drawn in the kernel from the call
    key ``noise_key`` (kernels.output_normals; None: no noise). One call does it all; from
    MIN_BLAS_MVM multiply-adds on, the product runs in torch's BLAS between the kernel's
    DAC and ADC (float rounding apart, the same outputs)."""
    x = _floats(x)
    rows, cols = terms[0][0].shape
    for w, _ in terms:
        _check_weights(w)
    batch, n_in = x.shape
    n_out = rows if not transpose else cols
    keyed, key = noise_key is not None, noise_key or 0
    lib = _require()
    threads = _threads(batch * n_out * n_in, MIN_THREADED_MVM)
    if batch * n_out * n_in < MIN_BLAS_MVM:
        y = torch.empty((batch, n_out))
        k = len(terms)
        ptrs = (ctypes.c_void_p * k)(*[w.data_ptr() for w, _ in terms])
        coeffs = (ctypes.c_float * k)(*[c for _, c in terms])
        lib.hil_mvm(x.data_ptr(), batch, rows, cols, int(transpose), k, ptrs, coeffs,
                    int(keyed), key, sigma, inp_bound, inp_res, out_bound, out_res,
                    y.data_ptr(), threads)
        return y
    xq, scale = torch.empty_like(x), torch.empty(batch)
    lib.hil_dac(x.data_ptr(), batch, n_in, inp_bound, inp_res, xq.data_ptr(), scale.data_ptr())
    y = (xq @ operand(terms, transpose)).contiguous()
    lib.hil_adc(y.data_ptr(), batch, n_out, int(keyed), key, sigma, out_bound, out_res,
                scale.data_ptr(), threads)
    return y


def _floats(t: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.float32 and t.is_contiguous():
        return t
    return t.to(torch.float32).contiguous()


def _threads(work: int, least: int | None = None) -> int:
    """Kernel threads for ``work`` (device-samples; multiply-adds with ``least`` =
    MIN_THREADED_MVM): torch's thread count from ``least`` (MIN_THREADED) on, else one."""
    return torch.get_num_threads() if work >= (least or MIN_THREADED) else 1


def _check_weights(w: torch.Tensor) -> None:
    if w.dtype != torch.float32 or not w.is_contiguous() or w.device.type != "cpu":
        raise ValueError("native kernel: weights must be contiguous float32 on the CPU")


def _device_args(fp: FusedParams, noisy: bool) -> tuple:
    """The kernel arguments from family to gamma: the devices' coefficients (pointers taken
    at each call: a cached pointer would dangle in a copied or unpickled FusedParams) and
    their strides (0: one value for all devices, read once)."""
    family, gamma = _family(fp)
    kp, km, tmin, tmax, _, c2c = fp.tensors()
    return (family, int(noisy), kp.data_ptr(), km.data_ptr(), tmin.data_ptr(),
            tmax.data_ptr(), _ptr(fp.g), 0 if fp.uniform else 1, c2c.data_ptr(),
            1 if c2c.dim() else 0, gamma)


def _check(rc: int) -> None:
    if rc != 0:
        raise RuntimeError(f"native pulse kernel failed (code {rc})")


def pulse_normal(h: int, t: int) -> float:
    """The native kernel's normal of pulse t of stream h (tests compare it to kernels')."""
    lib = _require()
    return float(lib.hil_pulse_normal(h, t))
