"""Which SAE family is best on the demo's budget: one command, a table and a Pareto plot.

    python benchmarks/bench_families.py [--variants=...] [--steps=N] [--out=benchmarks/out/families]

Trains every variant of experiments/sae_families.py on the demo LM's MLP activations (on
the fly, the demo's 400 steps x 4,096 tokens unless --steps), evaluates each on held-out
text, and trains every family on the synthetic ground-truth problem in its hard setting
(many more true features than the dictionary's width, power-law frequencies, co-firing
pairs). The demo corpus and LM are built first when --lm_dir holds no LM (as `make demo`
does). Writes <out>/results.json, <out>/families.md (the tables for benchmarks/RESULTS.md)
and <out>/pareto.png (L0 against loss recovered). A finished variant is read back from
<out>/<variant>/result.json unless --rerun.
"""

from __future__ import annotations

import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app, flags  # noqa: E402

DEFAULT = ("relu_l3e-3,relu_l1e-2,april_l1e-3,april_l3e-3,topk_k16,topk_k24,topk_k32,"
           "batchtopk_k16,batchtopk_k24,batchtopk_k32,matryoshka_k16,matryoshka_k32,"
           "jumprelu_l3e-3,jumprelu_l1e-2,gated_l3e-3,gated_l1e-2")
_VARIANTS = flags.DEFINE_string("variants", DEFAULT, "comma-separated experiments/sae_families.py variants")
_STEPS = flags.DEFINE_integer("steps", None, "override every variant's num_steps (default: the demo's 400)")
_OUT = flags.DEFINE_string("out", os.path.join(ROOT, "benchmarks", "out", "families"), "output directory")
_LM = flags.DEFINE_string("lm_dir", os.path.join(ROOT, "runs", "demo", "lm"), "the demo LM (built if missing)")
_RERUN = flags.DEFINE_bool("rerun", False, "retrain variants that have a result already")
_GT = flags.DEFINE_bool("ground_truth", True, "also run the synthetic ground-truth comparison")
_GT_STEPS = flags.DEFINE_integer("gt_steps", 3000, "steps per family on the synthetic problem")

# One setting per family for the synthetic problem (D 64, 512 features, ~8 true active): the
# settings that recover the easy problem (tests/test_sae_families.py EASY), k and lambda
# scaled to ~8 active.
GT_SETTINGS = {
    "relu": dict(architecture="relu", l1_coefficient=1e-2),
    "april": dict(architecture="relu", l1_coefficient=1e-2, decoder="free", init="tied",
                  init_decoder_norm=0.1, sparsity_warmup_fraction=0.05, lr_decay_fraction=0.2,
                  grad_clip=1.0, dead_strategy="none"),
    "topk": dict(architecture="topk", k=8, aux_k=32),
    "batchtopk": dict(architecture="batchtopk", k=8, aux_k=32, init="kaiming"),
    "matryoshka": dict(architecture="matryoshka", k=8, aux_k=32, init="kaiming",
                       matryoshka_groups=(384, 128), lr_decay_fraction=0.2),
    "jumprelu": dict(architecture="jumprelu", l0_coefficient=3e-3, jumprelu_init_threshold=0.05,
                     jumprelu_bandwidth=0.02, sparsity_warmup_fraction=0.1),
    "gated": dict(architecture="gated", l1_coefficient=4e-2, init="kaiming", lr_decay_fraction=0.2),
}


def ensure_lm(lm_dir: str) -> None:
    """Builds the demo corpus and LM (600 steps, as `make demo`) unless ``lm_dir`` has one."""
    if os.path.isdir(lm_dir) and os.listdir(lm_dir):
        return
    import importlib

    from saejax.config import from_config
    from saejax.data.corpus import CorpusJobConfig, build_token_store
    from saejax.lm.config import LMTrainConfig
    from saejax.lm.train import train as train_lm

    demo = os.path.dirname(os.path.abspath(lm_dir))
    cd = importlib.import_module("experiments.corpus_stdlib").get_config()
    cd.corpus.out_dir = os.path.join(demo, "corpus")
    store = build_token_store(from_config(CorpusJobConfig, cd))
    cd = importlib.import_module("experiments.lm_paper").get_config()
    cd.store_dir, cd.workdir, cd.num_steps = store.directory, lm_dir, 600
    train_lm(from_config(LMTrainConfig, cd))


def run_variant(variant: str) -> dict:
    from experiments import sae_families
    from saejax.config import from_config
    from saejax.train import train
    from saejax.train_config import SAETrainConfig

    path = os.path.join(_OUT.value, variant, "result.json")
    if os.path.exists(path) and not _RERUN.value:
        with open(path) as f:
            return json.load(f)
    cd = sae_families.get_config(variant)
    cd.lm.dir = _LM.value
    cd.workdir = os.path.join(_OUT.value, variant, "run")
    cd.progress_bar = False
    if _STEPS.value:
        cd.num_steps = _STEPS.value
    cfg = from_config(SAETrainConfig, cd)
    t0 = time.perf_counter()
    res = train(cfg)
    if res.get("interrupted") or res["step"] < cfg.num_steps:
        raise SystemExit(f"{variant}: training stopped at step {res['step']} ({res.get('interrupted')}); "
                         f"no result recorded (re-run to resume it)")
    e = res["eval"]
    family, level, lr = sae_families.parse(variant)
    row = {"variant": variant, "family": family if lr is None else f"{family} lr {lr:g}", "level": level,
           "lr": cfg.sae.lr, "steps": res["step"],
           "tokens": res["step"] * cfg.batch_size,
           "loss_recovered": e["frac_loss_recovered"], "l0": e["l0"],
           "dead_train": res["train"]["frac_dead"],
           "silent_heldout": e["dead_features"] / cfg.sae.n_features,
           "heldout_tokens": e["eval_tokens"], "explained_variance": e["explained_variance"],
           "seconds": time.perf_counter() - t0}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(row, f, indent=1)
    print(json.dumps(row), flush=True)
    return row


def ground_truth(family: str, steps: int) -> dict:
    """One family on the hard synthetic problem: recovered fraction at cos >= 0.9, MMCS."""
    import jax

    from saejax.config import MeshConfig
    from saejax.parallel import make_mesh
    from saejax.sae import SAEConfig, init_state, make_resample, make_train_step, should_resample, synthetic
    from saejax.sae import metrics as gt_metrics

    sc = synthetic.SyntheticConfig(d_in=64, n_true_features=1024, mean_active=8.0, noise_std=0.01, seed=0,
                                   frequency_power=0.5, pair_fraction=0.25, pair_prob=0.5)
    t = synthetic.true_directions(sc)
    cfg = SAEConfig(d_in=64, n_features=512, lr=1e-3, dead_window=200, resample_steps=(500, 1000, 1500),
                    resample_sample_size=8192, resample_chunk_size=1024, total_steps=steps, seed=0,
                    **GT_SETTINGS[family])
    mesh = make_mesh(MeshConfig(data=1, model=1), devices=jax.devices()[:1])
    gen = jax.jit(lambda k, n: synthetic.sample(sc, k, n, t), static_argnums=1)
    root = jax.random.PRNGKey(2)
    state = init_state(cfg, mesh, gen(jax.random.PRNGKey(1), 4096))
    step, resample = make_train_step(cfg, mesh), make_resample(cfg, mesh)
    t0 = time.perf_counter()
    for i in range(steps):
        state, m = step(state, gen(jax.random.fold_in(root, i), 1024))
        if should_resample(cfg, i + 1):
            state, _ = resample(state, gen(jax.random.fold_in(root, 10**6 + i), cfg.resample_sample_size))
    w = state.params.W_dec
    # The "true" features a 512-wide dictionary can hold: the 512 most frequent ones.
    freq_order = jax.numpy.argsort(-synthetic.firing_probabilities(sc))
    return {"family": family, "recovered_all": gt_metrics.fraction_recovered(w, t, 0.9),
            "recovered_top512": gt_metrics.fraction_recovered(w, t[freq_order[:512]], 0.9),
            "mmcs_top512": gt_metrics.mmcs(w, t[freq_order[:512]]), "l0": float(m["l0"]),
            "explained_variance": float(m["explained_variance"]), "frac_dead": float(m["frac_dead"]),
            "seconds": time.perf_counter() - t0}


def pareto_plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    floor = 80.0
    below = []
    for fam in sorted({r["family"] for r in rows}):
        pts = sorted((r["l0"], 100 * r["loss_recovered"]) for r in rows if r["family"] == fam)
        ax.plot([p[0] for p in pts], [max(p[1], floor) for p in pts], "o-", label=fam)
        below += [f"{fam} {p[1]:.0f}% at L0 {p[0]:.0f}" for p in pts if p[1] < floor]
    ax.set_xscale("log")
    ax.set_ylim(floor - 1, 100)
    if below:
        ax.text(0.01, 0.01, "drawn at the floor (below 80%): " + "; ".join(below), transform=ax.transAxes,
                fontsize=6, va="bottom")
    ax.set_xlabel("L0 (mean active features per held-out token, log scale)")
    ax.set_ylabel("loss recovered (%)")
    ax.set_title("SAE families on the demo budget (4,096 features, 1.6M tokens)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv):
    del argv
    from saejax.metrics import quiet_orbax_logs

    quiet_orbax_logs()
    os.makedirs(_OUT.value, exist_ok=True)
    ensure_lm(_LM.value)
    rows = [run_variant(v) for v in _VARIANTS.value.split(",") if v]
    gt = []
    if _GT.value:
        gt_path = os.path.join(_OUT.value, f"ground_truth_{_GT_STEPS.value}.json")
        if os.path.exists(gt_path) and not _RERUN.value:
            with open(gt_path) as f:
                gt = json.load(f)
        else:
            gt = [ground_truth(fam, _GT_STEPS.value) for fam in GT_SETTINGS]
            with open(gt_path, "w") as f:
                json.dump(gt, f, indent=1)
    lines = ["| variant | L0 | loss recovered | dead (training window) | silent on held-out | EV | seconds |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['l0']:.1f} | {100 * r['loss_recovered']:.2f}% | "
                     f"{100 * r['dead_train']:.1f}% | {100 * r['silent_heldout']:.1f}% | "
                     f"{r['explained_variance']:.3f} | {r['seconds']:.0f} |")
    if gt:
        lines += ["", "| family (synthetic, hard) | recovered, all 1,024 | recovered, 512 most frequent | "
                  "MMCS, 512 most frequent | L0 | EV | dead |", "|---|---|---|---|---|---|---|"]
        for g in gt:
            lines.append(f"| {g['family']} | {100 * g['recovered_all']:.1f}% | {100 * g['recovered_top512']:.1f}% | "
                         f"{g['mmcs_top512']:.3f} | {g['l0']:.1f} | {g['explained_variance']:.3f} | "
                         f"{100 * g['frac_dead']:.1f}% |")
    with open(os.path.join(_OUT.value, "families.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(_OUT.value, "results.json"), "w") as f:
        json.dump({"lm": rows, "ground_truth": gt}, f, indent=1)
    if rows:
        pareto_plot(rows, os.path.join(_OUT.value, "pareto.png"))
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
