"""Evaluation of a dictionary inside the LM: loss recovered, KL, reconstruction, density.

Fraction of loss recovered (Bricken et al. 2023)::

    (L_ablated - L_sae) / (L_ablated - L_clean)

where L_sae is the next-token loss with the site's activations replaced by the SAE
reconstruction and L_ablated the loss with the site zero-ablated (the headline number) or
mean-ablated. Ablation happens at the SAE's own site (for ``mlp.post``: the 512 neurons,
so the MLP contributes only its output bias), which makes "reconstruction = 0" score
exactly 0% and "reconstruction = input" exactly 100%. KL divergences are those of the
clean next-token distribution to the spliced / ablated ones, per token.

Without an LM (a dictionary trained on activations alone), :func:`make_activation_eval_step`
computes what needs none from held-out activation rows: MSE, explained variance, L0 and
per-feature firing (silent / dense counts, density histogram). Both steps return sums that
:func:`summarize` turns into the same metric names.

Held-out data is read at most once: :func:`plan_batches` caps the requested evaluation at
the whole batches the data holds (never cycling a short validation split) and logs one
warning naming the requested and the available tokens; ``eval_tokens`` in the result is
the number of tokens actually evaluated. ``dead_features`` in the result counts the
features *silent on those evaluated tokens*, which is not the training-window "dead"
(``SAEConfig.dead_window``).

Legend: B batch (contexts), T sequence, D site width, F features, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jaxtyping import Array, Float, Int

from saejax import parallel
from saejax.lm.model import forward
from saejax.lm.sites import Ablate, Replace

Splice = Callable[[Any, Float[Array, "B T D"]], tuple[Float[Array, "B T D"], Float[Array, "B T F"]]]


def _token_losses(logits: Float[Array, "B T V"], tokens: Int[Array, "B T"]
                  ) -> tuple[Float[Array, "B T1"], Float[Array, "B T1 V"]]:
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return nll, logp


def _kl(logp_clean, logp_other) -> Float[Array, "B T1"]:
    return jnp.sum(jnp.exp(logp_clean) * (logp_clean - logp_other), axis=-1)


def make_eval_step(graphdef, site: str, splice: Splice, context_len: int | None = None):
    """A jitted ``(lm_params, splice_params, mean, tokens) -> sums`` for one token batch.

    Args:
      graphdef: the LM's graph definition.
      site: the site the SAE reads and replaces (e.g. "mlp.post").
      splice: ``(splice_params, acts) -> (reconstruction, feature activations)``; it applies
        any input normalisation and undoes it on the reconstruction.
      context_len: evaluate on the first ``context_len`` tokens of each context (the LM's
        maximum length); the loss covers the next-token predictions inside that window.

    Returns:
      A function returning per-batch sums: losses of the four runs, KLs, squared errors,
      variance terms, L0 and per-feature firing counts.
    """
    def recon_only(p, acts):
        return splice(p, acts)[0]

    @jax.jit
    def step(lm_params, splice_params, mean, tokens):
        tokens = tokens[:, :context_len]
        clean = forward(graphdef, lm_params, tokens, sites=(site,))
        (acts,) = clean.acts.values()  # keyed by the canonical site name
        x_hat, f = splice(splice_params, acts)
        runs = {
            "sae": forward(graphdef, lm_params, tokens,
                           interventions=(Replace(site, recon_only, splice_params),)).logits,
            "zero": forward(graphdef, lm_params, tokens, interventions=(Ablate.zero(site),)).logits,
            "mean": forward(graphdef, lm_params, tokens,
                            interventions=(Ablate.mean(site, mean),)).logits,
        }
        nll_clean, logp_clean = _token_losses(clean.logits, tokens)
        out = {"n_tokens": jnp.float32(nll_clean.size), "loss_clean": nll_clean.sum()}
        for name, logits in runs.items():
            nll, logp = _token_losses(logits, tokens)
            out[f"loss_{name}"] = nll.sum()
            out[f"kl_{name}"] = _kl(logp_clean, logp).sum()
        out.update(_reconstruction_sums(acts, x_hat, f))
        return out

    return step


def _reconstruction_sums(acts, x_hat, f) -> dict[str, Array]:
    x = acts.reshape(-1, acts.shape[-1]).astype(jnp.float32)
    err = x_hat.reshape(x.shape).astype(jnp.float32) - x
    fired = f.reshape(x.shape[0], -1) > 0
    return {"n_rows": jnp.float32(x.shape[0]), "sq_err": jnp.sum(err * err),
            "sum_x": jnp.sum(x, axis=0), "sum_sq_x": jnp.sum(x * x),
            "l0": jnp.sum(fired.astype(jnp.float32)),
            "firing": jnp.sum(fired.astype(jnp.int32), axis=0)}


def make_activation_eval_step(splice: Splice):
    """A jitted ``(splice_params, acts [B, D]) -> sums`` for evaluation without an LM.

    The sums are :func:`make_eval_step`'s reconstruction terms (squared error, variance
    terms, L0, per-feature firing); :func:`summarize` reports MSE, explained variance, L0
    and dead / dense features from them.
    """
    @jax.jit
    def step(splice_params, acts):
        x_hat, f = splice(splice_params, acts)
        return _reconstruction_sums(acts, x_hat, f)

    return step


def summarize(sums: dict[str, np.ndarray], dense_threshold: float = 0.01) -> dict[str, Any]:
    """Turns accumulated sums into the reported metrics (the LM's only when it ran)."""
    n = float(sums["n_rows"])
    total_var = float(sums["sum_sq_x"]) - float(np.sum(np.square(sums["sum_x"]))) / n
    density = np.asarray(sums["firing"], np.float64) / n
    out: dict[str, Any] = {}
    if "n_tokens" in sums:
        n_tok = float(sums["n_tokens"])
        loss = {k: float(sums[f"loss_{k}"]) / n_tok for k in ("clean", "sae", "zero", "mean")}

        def recovered(ablated: float) -> float:
            gap = ablated - loss["clean"]
            return (ablated - loss["sae"]) / gap if gap != 0 else float("nan")

        out.update({
            "loss_clean": loss["clean"], "loss_sae": loss["sae"],
            "loss_zero_ablated": loss["zero"], "loss_mean_ablated": loss["mean"],
            "frac_loss_recovered": recovered(loss["zero"]),
            "frac_loss_recovered_mean_ablation": recovered(loss["mean"]),
            "kl_sae": float(sums["kl_sae"]) / n_tok,
            "kl_zero_ablated": float(sums["kl_zero"]) / n_tok,
            "kl_mean_ablated": float(sums["kl_mean"]) / n_tok})
    return {
        **out,
        "explained_variance": 1.0 - float(sums["sq_err"]) / total_var if total_var > 0 else float("nan"),
        "mse": float(sums["sq_err"]) / (n * len(sums["sum_x"])),
        "l0": float(sums["l0"]) / n,
        "dead_features": int(np.sum(density == 0)),
        "dense_features": int(np.sum(density > dense_threshold)),
        "eval_tokens": int(n),
        "feature_density": density,
    }


def plan_batches(requested: int, batch: int, available: int, *, field: str, what: str,
                 unit: str = "tokens", tokens_per_row: int = 1) -> int:
    """Whole batches to evaluate: ``requested`` rows, but each of the ``available`` at most once.

    A held-out set smaller than the request is evaluated once, as far as it fills whole
    batches, instead of being cycled; one warning line then names the requested, available
    and evaluated tokens.

    Args:
      requested: rows (contexts, or activation rows) the config asks for.
      batch: rows per evaluation batch.
      available: rows the held-out data holds.
      field: the config field behind ``requested`` (for the warning), e.g. "eval.contexts".
      what: the held-out data (for the warning), e.g. "the token store's 'val' split".
      unit: what a row is ("contexts", or "tokens" for activation rows).
      tokens_per_row: tokens a row contributes to the evaluation (the context length).

    Returns:
      The number of batches to read: ``requested // batch`` (at least 1), capped at
      ``available // batch`` (at least 1; loaders refuse data smaller than one batch).
    """
    want = max(1, requested // batch)
    have = max(1, available // batch)
    if want <= have:
        return want

    def count(rows: int) -> str:
        return (f"{rows:,} {unit}" if unit == "tokens"
                else f"{rows:,} {unit} ({rows * tokens_per_row:,} tokens)")

    logging.warning("evaluation: %s = %s requested, but %s holds %s: evaluating on %s, "
                    "each once", field, count(requested), what, count(available),
                    count(have * batch))
    return have


def _accumulate(outs: Iterable[dict[str, Array]], dense_threshold: float) -> dict[str, Any]:
    total = None
    for out in outs:
        total = out if total is None else jax.tree.map(jnp.add, total, out)
    if total is None:
        raise ValueError("evaluation got no batches")
    return summarize(parallel.to_host(total), dense_threshold)


def evaluate(step, lm_params, splice_params, mean, batches: Iterable[Int[Array, "B T"]],
             dense_threshold: float = 0.01) -> dict[str, Any]:
    """Runs ``step`` over token batches and summarises (see :func:`summarize`)."""
    return _accumulate((step(lm_params, splice_params, mean, t) for t in batches), dense_threshold)


def evaluate_activations(step, splice_params, batches: Iterable[Float[Array, "B D"]],
                         dense_threshold: float = 0.01) -> dict[str, Any]:
    """Runs a :func:`make_activation_eval_step` over activation batches and summarises."""
    return _accumulate((step(splice_params, x) for x in batches), dense_threshold)


def density_histogram(density: np.ndarray, floor: float = 1e-10, bins: int = 50
                      ) -> tuple[np.ndarray, np.ndarray, int]:
    """log10 feature-density histogram of the features that fired, and the count of those
    that never fired (silent on the evaluated tokens)."""
    alive = density[density > 0]
    hist, edges = np.histogram(np.log10(np.maximum(alive, floor)), bins=bins,
                               range=(np.log10(floor), 0.0))
    return hist, edges, int(np.sum(density == 0))
