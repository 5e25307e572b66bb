"""Moving dictionaries between saejax and other tools.

- :mod:`saejax.interop.saelens`: the SAELens on-disk format (``cfg.json``,
  ``sae_weights.safetensors``, ``sparsity.safetensors``): :func:`~saejax.interop.saelens.export_saelens`
  and :func:`~saejax.interop.saelens.load_saelens`.
"""
