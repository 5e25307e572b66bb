"""Harvest the paper LM's MLP activations (mlp.post, 512 wide) into an activation store.

    python launch/harvest.py --config=experiments/harvest.py \
        --config.lm_dir=runs/lm/paper --config.out_dir=runs/acts/paper

Writes ~16 MB float32 chunks (rows a multiple of the 8,192 SAE batch) with per-chunk crc32,
normalisation statistics and the LM/site/token-range identity in metadata.json. Use
--config.dtype=bfloat16 to halve the size; --config.num_contexts to bound it.
"""

import ml_collections

from experiments import common


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.lm_dir = "runs/lm/paper"
    c.site = "mlp.post"
    c.store_dir = ml_collections.FieldReference(None, field_type=str)  # a HF checkpoint needs one
    c.out_dir = "runs/acts/paper"
    c.split = "train"
    c.start_context = 0
    c.num_contexts = 0
    c.lm_batch_size = 64
    c.sae_batch_size = 8192
    c.dtype = "float32"
    c.chunk_mb = 16.0
    c.seed = 0
    c.overwrite = False
    c.mesh = common.mesh()
    c.distributed = common.distributed()
    return c
