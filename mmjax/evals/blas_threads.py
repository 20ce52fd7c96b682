"""BLAS threading for the small scikit-learn fits of the evals."""

import contextlib

import numpy as np

SINGLE_THREAD_BELOW = 1 << 22  # feature-matrix entries under which BLAS gets one thread


def blas_threads_for(features: np.ndarray) -> contextlib.AbstractContextManager:
    """One BLAS thread while fitting a small `features` matrix, the default for a large one:
    beside JAX's own thread pool, BLAS threads slow small fits down 10-20x (2 CPU cores)."""
    from threadpoolctl import threadpool_limits  # Lazy: a scikit-learn dependency.

    small = features.size < SINGLE_THREAD_BELOW
    return threadpool_limits(1, user_api="blas") if small else contextlib.nullcontext()
