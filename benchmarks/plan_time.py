"""How long `optimum-npu plan` takes for a Llama-3-70B-shaped model, against the goal (30 s, 2 GiB).

    python benchmarks/plan_time.py [--input-len 2048] [--output-len 2048] [--npu RBLN-CA25]

Plans meta-llama/Meta-Llama-3-70B's architecture (its public config.json; no weights) over the
planner's default grid and prints wall time, CPU time of this process and its peak host memory
(max RSS) next to the goal. Wall time on a shared machine depends on the load: the CPU time is
the steadier figure. The same measurement from a shell:

    /usr/bin/time -v optimum-npu plan <folder with that config.json> --input-len 2048 --output-len 2048
"""

from __future__ import annotations

import argparse
import resource
import time

from model_shapes import llama3_config

from optimum_npu import plan

GOAL_S, GOAL_RSS_GIB = 30.0, 2.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input-len", type=int, default=2048)
    parser.add_argument("--output-len", type=int, default=2048)
    parser.add_argument("--npu", default="RBLN-CA25")
    args = parser.parse_args()
    wall, cpu = time.perf_counter(), time.process_time()
    result = plan(llama3_config("70b"), args.npu, input_len=args.input_len, output_len=args.output_len)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # Linux: KiB
    print(f"Llama-3-70B-shaped plan on {args.npu}, {args.input_len} in / {args.output_len} out: "
          f"{len(result.candidates)} feasible, {len(result.rejected)} rejected\n")
    print(f"{'':<18} | {'measured':>9} | {'goal':>6} | {'ratio':>5}")
    for name, measured, goal in (("wall time, s", wall, GOAL_S), ("CPU time, s", cpu, GOAL_S),
                                 ("max RSS, GiB", rss_gib, GOAL_RSS_GIB)):
        print(f"{name:<18} | {measured:>9.2f} | {goal:>6.1f} | {measured / goal:>5.2f}")


if __name__ == "__main__":
    main()
