"""Harvest the paper LM's MLP activations (mlp.post, 512 wide) into an activation store.

    python launch/harvest.py --config=experiments/harvest.py \
        --config.lm_dir=runs/lm/paper --config.out_dir=runs/acts/paper

Writes ~16 MB float32 chunks (rows a multiple of the 8,192 SAE batch) with per-chunk crc32,
normalisation statistics and the LM/site/token-range identity in metadata.json. Use
--config.dtype=bfloat16 to halve the size; --config.num_contexts to bound it.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.lm_dir = "runs/lm/paper"
    c.site = "mlp.post"
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
    c.mesh = ml_collections.ConfigDict(dict(data=-1, model=1))
    c.distributed = ml_collections.ConfigDict(dict(
        enabled=False, coordinator_address=ml_collections.FieldReference(None, field_type=str),
        num_processes=ml_collections.FieldReference(None, field_type=int),
        process_id=ml_collections.FieldReference(None, field_type=int)))
    return c
