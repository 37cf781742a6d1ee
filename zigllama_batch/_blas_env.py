"""Set before numpy loads OpenBLAS: its idle worker threads sleep at once instead of spinning.

After each call OpenBLAS's workers spin for about 2^28 cycles waiting for the next one
(``OPENBLAS_THREAD_TIMEOUT``, default 28). The engine alternates numpy's BLAS (attention)
with numba's kernel threads on the same cores, and a spinning BLAS worker takes a core from
them: on 2 cores, prefill of 256 and 1,000 tokens ran at 232 and 266 tokens/s with the default
and 491 and 452 with the shortest timeout (2^4), decode unchanged. A value the user set wins.
When numpy was imported first, the kernels module has OpenBLAS read the variable again.
"""

import os

THREAD_TIMEOUT = "4"
"""2^4 cycles: OpenBLAS's shortest."""

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", THREAD_TIMEOUT)
