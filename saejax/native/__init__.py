"""Native CPU kernels called through the XLA FFI, compiled from source on first use.

:func:`top_k` is ``lax.top_k`` (same values, indices, order and ties) with a multi-threaded
C++ kernel on XLA:CPU, 4-6x faster than XLA's at the sparse step's shapes
(benchmarks/RESULTS.md). The source (``topk.cc``, next to this file) is compiled by the
system's C++ compiler against jaxlib's FFI headers the first time it is needed, into a
cache directory keyed by the source, jaxlib's version, the compiler and the CPU:
``$SAEJAX_NATIVE_CACHE``, else ``$XDG_CACHE_HOME/saejax/native``, else
``~/.cache/saejax/native``. Nothing is downloaded.

Where the kernel cannot be used, :func:`top_k` is ``lax.top_k``: on other backends, other
dtypes, with ``SAEJAX_NATIVE=0``, or when no compiler is found or the build fails (one
warning says why). The kernel knows nothing of sharding: call it where arrays are local
(inside ``shard_map``), not on arrays that GSPMD partitions.
"""

from saejax.native.topk import available, build_error, top_k

__all__ = ["available", "build_error", "top_k"]
