"""Resampling draws: the two-level categorical draw vs a float32 inverse CDF.

    python benchmarks/bench_resample_draws.py

Times a jitted ``saejax.sae.resample.draw_inputs`` (F draws from S loss^2 weights) against
the float32 inverse CDF it replaced, at the demo's and the paper's largest sizes, best of
three, and prints the implied total variation of the float32 inverse CDF for reference.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    import jax
    import jax.numpy as jnp
    import numpy as np

    from saejax.sae.resample import draw_inputs

    print("| sample S, dictionary F | two-level Gumbel-max | float32 inverse CDF | "
          "inverse CDF: total variation, inputs at p = 0 |\n|---|---|---|---|")
    for s, f in ((65_536, 4096), (819_200, 131_072)):
        w = (np.random.default_rng(0).lognormal(0.0, 1.0, s) ** 2).astype(np.float32)
        wj = jnp.asarray(w)
        gumbel = jax.jit(lambda k, w, f=f: draw_inputs(k, w, f))
        inverse = jax.jit(lambda k, w, f=f, s=s: jnp.clip(jnp.searchsorted(
            jnp.cumsum(w), jax.random.uniform(k, (f,)) * jnp.sum(w), side="right"), 0, s - 1))
        times = []
        for fn in (gumbel, inverse):
            fn(jax.random.key(0), wj).block_until_ready()
            best = float("inf")
            for i in range(3):
                t0 = time.perf_counter()
                fn(jax.random.key(i + 1), wj).block_until_ready()
                best = min(best, time.perf_counter() - t0)
            times.append(best)
        cdf = np.asarray(jnp.cumsum(wj), np.float64)
        implied = np.diff(cdf, prepend=0.0) / cdf[-1]
        exact = w.astype(np.float64) / w.astype(np.float64).sum()
        tv = 0.5 * np.abs(implied - exact).sum()
        print(f"| {s:,}, {f:,} | {1e3 * times[0]:.0f} ms | {1e3 * times[1]:.0f} ms | "
              f"{100 * tv:.2f}%, {int(np.sum(implied == 0)):,} |")


if __name__ == "__main__":
    main()
