"""ConfigDict sections shared by the experiment files (mesh and multi-host settings)."""

import ml_collections


def mesh() -> ml_collections.ConfigDict:
    """All devices data-parallel; override e.g. --config.mesh.model=8 to shard dictionaries."""
    return ml_collections.ConfigDict(dict(data=-1, model=1))


def distributed() -> ml_collections.ConfigDict:
    """Off; launch/multihost/ scripts switch it on (--config.distributed.enabled=true)."""
    return ml_collections.ConfigDict(dict(
        enabled=False, coordinator_address=ml_collections.FieldReference(None, field_type=str),
        num_processes=ml_collections.FieldReference(None, field_type=int),
        process_id=ml_collections.FieldReference(None, field_type=int),
        heartbeat_timeout_s=100))
