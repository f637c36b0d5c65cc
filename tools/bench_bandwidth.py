"""The memory bandwidth the decode roofline divides by, measured two ways (GPU).

    python tools/bench_bandwidth.py [--mb 1024 --mb 4096]

For a copy pass (read + write) and a read pass (a sum) over an array of each size: the old
measure, the bytes of 8 chained passes over the whole call time (it also counts what a call
pays once: dispatch, sync, and the copy of the argument into the loop's buffer), and the
measure `bench_decode.copy_bandwidth` / `read_bandwidth` use now, the bytes of 32 extra passes
over the time they add. One JSON object per line.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from bench_decode import best_time, copy_bandwidth, copy_loop, read_bandwidth  # tools/


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, action="append",
                        help="array size(s) in MiB (default 1024 and 4096)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    if any(mb < 1 for mb in args.mb or []):
        parser.error(f"--mb must be at least 1 (got {args.mb}); a GPU measure wants 1024 or more")
    print(json.dumps({"device": jax.devices()[0].device_kind, "jax": jax.__version__}), flush=True)
    copy8 = copy_loop(8)
    for mb in args.mb or [1024, 4096]:
        nbytes = mb << 20
        x = jnp.ones((nbytes // 4,), jnp.float32)
        old = 2 * nbytes * 8 / best_time(copy8, x, args.repeats)
        del x
        print(json.dumps({"MiB": mb, "copy_8_passes_over_call_GBps": round(old / 1e9, 1),
                          "copy_per_pass_GBps": round(copy_bandwidth(nbytes, args.repeats) / 1e9, 1),
                          "read_per_pass_GBps": round(read_bandwidth(nbytes, args.repeats) / 1e9, 1)}),
              flush=True)


if __name__ == "__main__":
    main()
