"""Steering: sampling with a feature pinned (the paper's pinned-feature sampling) or added.

Two interventions at the dictionary's site, applied at every position while generating
(:func:`saejax.lm.generate.generate`):

* **clamp** (pin) feature i to ``value`` (SAE units): ``acts + (value - f_i(acts)) * d_i``
  with ``d_i`` the decoder vector in the LM's units (``SAEBundle.directions``), i.e. the
  SAE's decomposition of the activations keeps everything but its coefficient on d_i,
  which becomes ``value`` (:class:`saejax.lm.sites.Clamp` with a feature reader). The paper
  pins a feature to a high value, e.g. a base64 feature makes the model write base64.
* **add** ``scale * d_i`` to the activations (:class:`saejax.lm.sites.Add`), independent
  of what the feature reads.

Legend: B batch, T sequence, L generated length, D site width, F features, K tokens.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

from saejax.lm.generate import generate
from saejax.lm.model import forward, lm_module, split_lm
from saejax.lm.sites import Add, Clamp, Intervention
from saejax.normalize import Normalizer
from saejax.sae.bundle import SAEBundle
from saejax.sae.config import SAEConfig
from saejax.sae.model import SAEParams


@dataclasses.dataclass(frozen=True)
class FeatureReader:
    """``(sae_params, acts [B, T, D]) -> [B, T]``: feature ``feature``'s activation (SAE units).

    A frozen dataclass, so it is hashable and compares by value: it can be the static
    ``read_fn`` of a :class:`~saejax.lm.sites.Clamp` without recompiling per call.
    """

    config: SAEConfig
    feature: int
    normalizer: Normalizer = Normalizer()

    def __call__(self, params: SAEParams, acts: Float[Array, "B T D"]) -> Float[Array, "B T"]:
        return SAEBundle(params, self.config, self.normalizer).encode(acts)[..., self.feature]


def _check_feature(sae: SAEBundle, feature: int) -> None:
    if not 0 <= feature < sae.n_features:
        raise ValueError(f"feature {feature} out of range: the dictionary has "
                         f"{sae.n_features} features")


def clamp_feature(sae: SAEBundle, feature: int, value: float) -> Clamp:
    """An intervention pinning ``feature`` to ``value`` (SAE units) at the SAE's site."""
    _check_feature(sae, feature)
    return Clamp(site=sae.site, direction=sae.directions()[feature], value=jnp.float32(value),
                 read_fn=FeatureReader(sae.config, feature, sae.normalizer),
                 read_params=sae.params)


def add_feature(sae: SAEBundle, feature: int, scale: float) -> Add:
    """An intervention adding ``scale`` times the feature's decoder vector at every position."""
    _check_feature(sae, feature)
    return Add(site=sae.site, vector=sae.directions()[feature], scale=jnp.float32(scale))


def steering_intervention(sae: SAEBundle, feature: int, *, value: float | None = None,
                          scale: float | None = None) -> Intervention:
    """Exactly one of ``value`` (clamp) or ``scale`` (add)."""
    if (value is None) == (scale is None):
        raise ValueError("give exactly one of value (clamp the feature) or scale (add its "
                         "decoder direction)")
    return clamp_feature(sae, feature, value) if value is not None else add_feature(
        sae, feature, scale)


def steer(lm, sae: SAEBundle, prompts: Int[Array, "B P"], *, feature: int,
          value: float | None = None, scale: float | None = None, length: int,
          key: PRNGKeyArray, temperature: float = 1.0, top_k: int = 0,
          prompt_lens: Int[Array, " B"] | None = None) -> Int[Array, "B L"]:
    """Generates with ``feature`` clamped to ``value`` or added at ``scale``.

    Args:
      lm: the LM (``Transformer`` or ``(graphdef, params)``).
      sae: the dictionary.
      prompts: left-aligned prompt ids [B, P].
      feature: feature id.
      value: clamp the feature to this activation (SAE units), or
      scale: add this multiple of its decoder direction.
      length, key, temperature, top_k, prompt_lens: as :func:`saejax.lm.generate.generate`.

    Returns:
      Token ids [B, length] (prompt followed by samples).
    """
    iv = steering_intervention(sae, feature, value=value, scale=scale)
    return generate(split_lm(lm), prompts, length=length, key=key, prompt_lens=prompt_lens,
                    temperature=temperature, top_k=top_k, interventions=(iv,))


def steer_text(lm, sae: SAEBundle, tokenizer, prompt: str, *, feature: int,
               value: float | None = None, scale: float | None = None, num_tokens: int = 64,
               num_samples: int = 1, temperature: float = 1.0, top_k: int = 0, seed: int = 0,
               max_len: int | None = None) -> dict[str, list[str]]:
    """Baseline and steered continuations of a text prompt (same random keys for both).

    Returns:
      {"baseline": [text, ...], "steered": [text, ...]}: continuations without the prompt.
    """
    ids = tokenizer.encode(prompt) or [tokenizer.eot_id]
    model_max = max_len or lm_module(lm).cfg.max_len
    ids = ids[-(model_max - 1):]
    length = min(len(ids) + num_tokens, model_max)
    prompts = jnp.asarray([ids] * num_samples, jnp.int32)
    key = jax.random.key(seed)
    gd_params = split_lm(lm)
    base = generate(gd_params, prompts, length=length, key=key, temperature=temperature,
                    top_k=top_k)
    steered = steer(gd_params, sae, prompts, feature=feature, value=value, scale=scale,
                    length=length, key=key, temperature=temperature, top_k=top_k)

    def continuations(rows) -> list[str]:
        return [tokenizer.decode(np.asarray(r)[len(ids):].tolist()) for r in rows]

    return {"baseline": continuations(base), "steered": continuations(steered)}


def feature_activation(lm, sae: SAEBundle, tokens: Int[Array, "B T"], feature: int,
                       interventions: tuple[Intervention, ...] = ()) -> Float[Array, "B T"]:
    """The feature's activation on ``tokens`` as the SAE reads the site after interventions."""
    graphdef, params = split_lm(lm)
    out = forward(graphdef, params, jnp.asarray(tokens, jnp.int32), sites=(sae.site,),
                  logits=False, interventions=interventions)
    (acts,) = out.acts.values()
    return FeatureReader(sae.config, feature, sae.normalizer)(sae.params, acts)


def next_token_mass(lm, tokens: Int[Array, "B T"], token_ids: Int[Array, " K"],
                    interventions: tuple[Intervention, ...] = ()) -> Float[Array, "B T"]:
    """Probability the model puts on any of ``token_ids`` as the next token, per position."""
    graphdef, params = split_lm(lm)
    logits = forward(graphdef, params, jnp.asarray(tokens, jnp.int32),
                     interventions=interventions).logits
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return probs[..., jnp.asarray(token_ids)].sum(-1)
