"""Sweeps: many dictionaries from one activation pass (``launch/train_sae.py`` with ``members``).

    python launch/train_sae.py --config=experiments/sae_sweep.py:demo --config.lm.dir=runs/demo/lm

Every field outside ``members`` is shared (LM, site, source, batch, steps, evaluation,
checkpoints); each member overrides fields of ``sae``. Members equal but for lr, the
L1 / L0 / AuxK coefficients, k and seed are stacked and trained by one jitted step
(saejax/sae/sweep_step.py); the others form one step per shape. Results: ``sweep.md``,
``sweep.json`` and ``sweep_pareto.png`` in the workdir; each member's metrics and
evaluation in ``members/<name>/``; ``restore_run(workdir, member=name)`` restores one.

Arguments:
  demo  8 dictionaries of 2,048 features on the demo LM's MLP neurons, 300 steps of 4,096
        activations (1.2M tokens): TopK k in {16, 24, 32}, BatchTopK k in {16, 24},
        ReLU + L1 lambda in {5e-3, 1e-2, 2e-2}; three groups.
  tiny  4 dictionaries on the tiny test LM (experiments/lm_tiny.py), 30 steps, in seconds.
"""

import ml_collections

from experiments import sae_demo, sae_tiny


def _member(name: str, **sae) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"name": name, "sae": sae})


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
    c = _get(arg)
    c.sweep_memory_limit_bytes = 0  # 0: the device's memory (host memory on a CPU)
    # "members": each device trains whole dictionaries (needs each group's size to divide
    # over mesh.model); "features": each dictionary split over mesh.model; "auto" chooses.
    c.member_sharding = "auto"
    return c


def _get(arg: str) -> ml_collections.ConfigDict:
    if arg == "tiny":
        c = sae_tiny.get_config()
        c.workdir = "runs/sae/sweep_tiny"
        c.num_steps = 30
        c.sae.resample_steps = (10, 20)
        c.checkpoint.every = 10
        c.members = [_member("relu_1e-3", l1_coefficient=1e-3),
                     _member("relu_3e-3", l1_coefficient=3e-3, seed=1),
                     _member("topk_8", architecture="topk", k=8, aux_k=16),
                     _member("topk_16", architecture="topk", k=16, aux_k=16)]
        return c
    if arg != "demo":
        raise ValueError(f"experiments/sae_sweep.py: unknown argument {arg!r}; use demo or tiny")
    c = sae_demo.get_config("topk")
    c.workdir = "runs/demo/sweep"
    c.num_steps = 300
    c.sae.update(n_features=2048, resample_steps=(100, 200), dead_window=100)
    c.eval.update(every=300)
    c.members = [_member(f"topk_k{k}", architecture="topk", k=k) for k in (16, 24, 32)] + \
        [_member(f"batchtopk_k{k}", architecture="batchtopk", k=k, dead_strategy="none", aux_k=256)
         for k in (16, 24)] + \
        [_member(f"relu_l{lam:g}", architecture="relu", l1_coefficient=lam) for lam in (5e-3, 1e-2, 2e-2)]
    return c
