"""TransformerLens hook names of saejax's sites, both ways (the SAELens format names its
site by the hook: ``metadata.hook_name``)."""

from __future__ import annotations

import re

# saejax site kind -> TransformerLens hook name inside ``blocks.{l}`` (HookedTransformer's
# TransformerBlock and MLP components).
TL_HOOKS = {"resid.pre": "hook_resid_pre", "attn.out": "hook_attn_out",
            "resid.mid": "hook_resid_mid", "mlp.pre": "mlp.hook_pre",
            "mlp.post": "mlp.hook_post", "mlp.out": "hook_mlp_out",
            "resid.post": "hook_resid_post"}
_SITES = {hook: kind for kind, hook in TL_HOOKS.items()}


def hook_name(site: str) -> str:
    """The TransformerLens hook name of a saejax site ("blocks.0.mlp.post" ->
    "blocks.0.mlp.hook_post"; the short form "mlp.post" is layer 0); ValueError for a name
    that is not a saejax site."""
    full = site if site.startswith("blocks.") else f"blocks.0.{site}"
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", full)
    if not m or m.group(2) not in TL_HOOKS:
        raise ValueError(f"site {site!r} is not a saejax site ([blocks.<layer>.]<kind> with "
                         f"kind in {list(TL_HOOKS)})")
    return f"blocks.{m.group(1)}.{TL_HOOKS[m.group(2)]}"


def site_from_hook(hook: str | None) -> str | None:
    """The saejax site of a TransformerLens hook name, or None when saejax's LM has none
    (e.g. "blocks.0.attn.hook_z", "hook_embed")."""
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", hook or "")
    if not m or m.group(2) not in _SITES:
        return None
    return f"blocks.{m.group(1)}.{_SITES[m.group(2)]}"
