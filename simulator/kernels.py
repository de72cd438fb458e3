"""Array kernels of the image-domain simulator: few passes over large float32 series.

The image path spends its time in element-wise passes over [frames, rows, cols] float32 series
(about 1.7 M values each); these helpers do that work in place and in as few passes as numpy
allows, and split a matrix product into column blocks small enough for OpenBLAS to run them on
the calling thread (its threads, spinning next to torch's OpenMP threads on the shared 2-core
machine, made one [63, 14] @ [14, 27648] product take 20-300 ms instead of under 1 ms).
"""

from __future__ import annotations

import functools

import numpy as np

NOISE_BANK_SIZE = 2**23
NOISE_BANK_SEED = 20201
# OpenBLAS runs a GEMM single-threaded below m * n * k = 65536 * 4 (interface/gemm.c)
MATMUL_SINGLE_THREAD_FLOPS = 200_000


@functools.lru_cache(maxsize=1)
def noise_banks() -> tuple[np.ndarray, np.ndarray]:
    """(bank, bank**2): 2**23 standard normal float32 samples from a fixed seed, and their squares."""
    bank = np.random.default_rng(NOISE_BANK_SEED).standard_normal(NOISE_BANK_SIZE, dtype=np.float32)
    bank.flags.writeable = False
    squared = bank * bank
    squared.flags.writeable = False
    return bank, squared


def draw_bank_noise(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """Two independent standard normal series of ``size`` values for complex noise.

    Returns (real part, imaginary part squared, negate_real): read-only views of the banks at
    random offsets; the real part is to be negated when ``negate_real`` (a random sign, so that
    offsets are not the only source of variety). Draw order of ``rng``: offset and sign of the
    real part, then offset and sign of the imaginary part (the sign of a squared value is
    irrelevant but still drawn, keeping the stream the same as earlier versions). Falls back to
    fresh samples when ``size`` exceeds the bank.
    """
    bank, squared = noise_banks()
    if size > bank.size:
        real = rng.standard_normal(size, dtype=np.float32)
        imaginary = rng.standard_normal(size, dtype=np.float32)
        return real, np.square(imaginary, out=imaginary), False
    start_re = int(rng.integers(0, bank.size - size + 1))
    negate = bool(rng.random() >= 0.5)
    start_im = int(rng.integers(0, bank.size - size + 1))
    rng.random()
    return bank[start_re:start_re + size], squared[start_im:start_im + size], negate


def rician_in_place(image: np.ndarray, noise_re: np.ndarray, negate_re: bool, noise_im_squared: np.ndarray,
                    out: np.ndarray | None = None) -> np.ndarray:
    """``sqrt((image +/- noise_re)**2 + noise_im_squared)`` in float32, four passes.

    All arrays float32 with the same number of values (noise may be flat); noise in units of the
    image (callers scale the image by 1 / sigma instead of scaling two noise series by sigma).
    Writes into ``out`` (may be ``image``; a new array if None) and returns it.
    """
    noise_re = noise_re.reshape(image.shape)
    noise_im_squared = noise_im_squared.reshape(image.shape)
    out = np.subtract(image, noise_re, out=out) if negate_re else np.add(image, noise_re, out=out)
    np.square(out, out=out)
    out += noise_im_squared
    return np.sqrt(out, out=out)


def matmul_columns(a: np.ndarray, b: np.ndarray, block: int | None = None) -> np.ndarray:
    """``a @ b`` for 2-D float arrays, computed in column blocks of ``b`` (same values).

    ``block`` columns per product; default: as many as keep m * block * k under
    ``MATMUL_SINGLE_THREAD_FLOPS`` (single-threaded BLAS calls).
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"matmul_columns expects [m, k] @ [k, n], got {a.shape} @ {b.shape}")
    if block is None:
        block = max(16, MATMUL_SINGLE_THREAD_FLOPS // max(a.shape[0] * a.shape[1], 1))
    out = np.empty((a.shape[0], b.shape[1]), dtype=np.result_type(a, b))
    for start in range(0, b.shape[1], block):
        np.matmul(a, b[:, start:start + block], out=out[:, start:start + block])
    return out
