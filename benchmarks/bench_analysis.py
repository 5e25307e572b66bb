"""The analysis of a trained run: streaming-pass throughput, stage times, report sizes.

Runs ``saejax.analysis.report.analyze_run`` (what ``launch/analyze.py`` and ``make demo``'s
report stage run) on a trained SAE workdir and prints one JSON line: tokens analysed, the
feature pass's and the neuron pass's seconds and tokens/s (each pass's own timer, compile
included), the whole call's seconds, and the sizes of the dashboard and the statistics.

    python benchmarks/bench_analysis.py --workdir runs/demo/sae --tokens 2000000

Target (issue 17): >= 2M tokens analysed for 4,096 features in <= 3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="runs/demo/sae", help="a trained SAE run")
    ap.add_argument("--member", default=None, help="a sweep member")
    ap.add_argument("--tokens", type=int, default=2_000_000)
    ap.add_argument("--ablation_features", type=int, default=1024)
    ap.add_argument("--no_neurons", action="store_true")
    ap.add_argument("--form", choices=("auto", "sparse", "dense"), default="auto",
                    help="the feature pass's form (saejax.analysis.feature_passes.use_sparse)")
    ap.add_argument("--out", default=None, help="report folder (default: a temporary one)")
    args = ap.parse_args()

    from saejax.analysis.features import FeatureStatsConfig
    from saejax.analysis.report import analyze_run
    from saejax.metrics import quiet_orbax_logs

    quiet_orbax_logs()
    out = args.out or tempfile.mkdtemp(prefix="bench_analysis_")
    stages = []
    t0 = time.perf_counter()
    report = analyze_run(args.workdir, out, n_tokens=args.tokens, member=args.member,
                         config=FeatureStatsConfig(ablation_max_features=args.ablation_features
                                                   or None, pass_form=args.form),
                         neurons=not args.no_neurons,
                         progress=lambda m: stages.append((round(time.perf_counter() - t0, 1), m)))
    total = time.perf_counter() - t0
    meta = report["meta"]
    row = {"bench": "analysis", "machine": platform.processor() or platform.machine(),
           "cpus": os.cpu_count(), "features": report["sae"]["n_features"],
           "tokens": meta["n_tokens"], "split": meta["split"],
           "feature_pass_s": meta["pass_seconds"], "feature_tok_s": meta["tokens_per_second"],
           "pass_form": meta.get("pass_form"), "pass_cap": meta.get("pass_cap"),
           "pass_budget": meta.get("pass_budget"),
           "compacted_batches": meta.get("compacted_batches"), "dense_batches": meta.get("dense_batches"),
           "total_s": round(total, 1),
           "dashboard_mb": round(_size(os.path.dirname(report["dashboard"])) / 2**20, 1),
           "features_json_mb": round(_size(report["stats"]) / 2**20, 1), "stages": stages}
    if report.get("neurons"):
        with open(report["neurons"]) as f:
            nm = json.load(f)["meta"]
        row |= {"neuron_pass_s": nm["pass_seconds"], "neuron_tok_s": nm["tokens_per_second"]}
    print(json.dumps(row))


if __name__ == "__main__":
    main()
