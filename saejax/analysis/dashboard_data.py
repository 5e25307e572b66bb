"""The dashboard's data files: compact JavaScript the pages load with ``<script src>``.

Files (under ``<dashboard>/data/``; each assigns one global or calls one callback, so they
load from file://, where Chromium blocks fetch/XHR of local files):

  meta.js       ``window.SAEJAX_META = {...}``: unit label, counts, shard size, encodings.
  vocab.js      ``window.SAEJAX_VOCAB = [strings] | null``: every token string, once.
  index.js      ``window.SAEJAX_INDEX = {columns}``: one array per column, one entry per
                unit (id, density, mean act, max act, top token, top logit tokens, tags,
                interpretability kind / tokens / AUROC).
  search.js     ``window.SAEJAX_SEARCH = [codes]``: per unit, the token ids of its top
                contexts (overlapping windows merged; segments split by ``.``), for search.
  shard_<k>.js  ``saejaxShard(k, {"k": k, "units": [...]})``: units ``k*S .. k*S+S-1``.

Compact encodings (decoded by the pages' script):

  * token ids: fixed-width base-64 digits (``TOKEN_DIGITS`` per id, alphabet ``B64``);
  * activations: only the non-zero positive window entries, as (position, level) digit
    pairs, level = round(4095 * act / scale) in 1..4095 (2 digits), ``scale`` the unit's
    max activation (so each shown value is within 0.013% of max of the original);
  * a context: ``[row, pos, token digits, activation digits]``, plus its centre index when
    it is not ``window.before`` (a window clipped at the row's edge).

Every file is JSON wrapped in one assignment or call; the JSON escapes ``<``, ``>``, ``&``,
U+2028, U+2029 and lone surrogates, so no corpus string can end a script or the literal.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np

B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
LEVELS = 4095  # activation levels (2 base-64 digits)
TAG_BITS = {"silent": 1, "ultralow": 2, "dense": 4}
_SURROGATE = re.compile("[\ud800-\udfff]")


def js_json(obj: Any) -> str:
    """JSON that is also a safe JavaScript literal anywhere (script element or file)."""
    text = json.dumps(obj, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    for ch, rep in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, rep)
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def digits_for(n: int) -> int:
    """Base-64 digits needed to write 0 .. n-1."""
    d = 1
    while 64 ** d < n:
        d += 1
    return d


def code_table(n: int, width: int) -> list[str]:
    """The fixed-width base-64 codes of 0 .. n-1."""
    out = []
    for v in range(n):
        s = ""
        for _ in range(width):
            s = B64[v % 64] + s
            v //= 64
        out.append(s)
    return out


def sig(x: Any, digits: int = 4) -> float | None:
    """``x`` rounded to ``digits`` significant digits; None when not a finite number."""
    if x is None or isinstance(x, bool):
        return None
    x = float(x)
    if not math.isfinite(x):
        return None
    return 0.0 if x == 0 else float(f"{x:.{digits}g}")


def silent_ids(stats: dict) -> list[int]:
    """Units that never fired on the analysed tokens (format 2 ``silent``; format 1 ``dead``)."""
    return list(stats.get("silent", stats.get("dead", ())) or ())


def tag_bits(stats: dict) -> list[int]:
    """Per unit, the bitmask of its tags (``TAG_BITS``)."""
    bits = [0] * len(stats["features"])
    for name, ids in (("silent", silent_ids(stats)), ("ultralow", stats.get("ultralow") or ()),
                      ("dense", stats.get("dense") or ())):
        for i in ids:
            if 0 <= i < len(bits):
                bits[i] |= TAG_BITS[name]
    return bits


def examples(f: dict) -> list[dict]:
    """Every context of unit ``f``: its top examples, then its interval samples."""
    return list(f.get("top") or ()) + [ex for iv in f.get("intervals") or ()
                                       for ex in iv.get("examples") or ()]


def max_token_id(stats: dict) -> int:
    """The largest token id the data mentions (contexts and logit effects)."""
    m = len(stats.get("vocab") or ()) - 1
    for f in stats["features"]:
        for ex in examples(f):
            if ex["tokens"]:
                m = max(m, max(ex["tokens"]))
        for side in ("top", "bottom"):
            for t, _ in (f.get("logits") or {}).get(side) or ():
                m = max(m, int(t))
    return m


class Encoder:
    """Encodes one stats dict's units (see the module docstring), a unit at a time with
    numpy: the contexts of a unit share one window width."""

    def __init__(self, stats: dict):
        self.before = int((stats["meta"].get("window") or {}).get("before", 0))
        n_tok = max_token_id(stats) + 1
        self.tok_digits = digits_for(n_tok)
        self.tok = np.array(code_table(n_tok, self.tok_digits), dtype=f"S{self.tok_digits}")
        self.pos_digits = 1  # grows with the widest window seen (64 positions a digit)
        self._pos_lev = np.zeros((0, LEVELS + 1), "S3")

    def _codes(self, width: int) -> np.ndarray:
        """[width, LEVELS + 1] table of position-and-level codes."""
        if width > 64 ** self.pos_digits:
            raise ValueError(f"windows of {width} tokens: at most {64 ** self.pos_digits}")
        if self._pos_lev.shape[0] < width:
            pos = np.array(code_table(width, self.pos_digits), dtype=object)[:, None]
            lev = np.array(code_table(LEVELS + 1, 2), dtype=object)[None, :]
            self._pos_lev = (pos + lev).astype(f"S{self.pos_digits + 2}")
        return self._pos_lev

    def widen(self, stats: dict) -> None:
        """Sets the digits of window positions from the widest window in ``stats``."""
        width = max((len(ex["tokens"]) for f in stats["features"] for ex in examples(f)),
                    default=1)
        self.pos_digits = digits_for(width)

    def contexts(self, exs: list[dict], max_act: Any) -> tuple[float, list[list]]:
        """(scale, ``[row, pos, tokens, acts(, center)]`` of each example)."""
        if not exs:
            return 0.0, []
        widths = {len(ex["tokens"]) for ex in exs}
        if len(widths) > 1:  # ragged windows: one group per width, one scale
            scale = max(self.contexts([ex], max_act)[0] for ex in exs)
            return scale, [self.contexts([ex], scale)[1][0] for ex in exs]
        w = widths.pop()
        tok = np.array([ex["tokens"] for ex in exs], dtype=np.int64).reshape(len(exs), w)
        acts = np.array([ex["acts"] for ex in exs], dtype=np.float64).reshape(len(exs), w)
        center = np.array([ex["center"] for ex in exs], dtype=np.int64)
        act = np.array([ex.get("act") for ex in exs], dtype=np.float64)  # None -> nan
        ok = np.isfinite(act) & (center >= 0) & (center < w)
        acts[np.flatnonzero(ok), center[ok]] = act[ok]
        with np.errstate(invalid="ignore"):
            pos = np.isfinite(acts) & (acts > 0)
        m = float(max_act) if max_act is not None and math.isfinite(max_act) else 0.0
        scale = max(m, float(acts[pos].max()) if pos.any() else 0.0)
        inv = LEVELS / scale if scale > 0 else 0.0
        lev = np.clip(np.rint(np.where(pos, acts, 0.0) * inv), 1, LEVELS).astype(np.int64)
        codes = self._codes(w)[np.arange(w)[None, :], lev]
        # Non-zero entries first in each row (each carries its position), so that the row's
        # bytes end in the padding numpy strips.
        codes = np.sort(np.where(pos, codes, b"").astype(codes.dtype), axis=1)[:, ::-1]
        n = len(exs)
        if w:
            a_rows = np.ascontiguousarray(codes).view(f"S{w * codes.dtype.itemsize}")
            a_rows = a_rows.ravel().astype("U").tolist()
            t_rows = self.tok[tok].view(f"S{w * self.tok_digits}").ravel().astype("U").tolist()
        else:
            a_rows = t_rows = [""] * n
        out = [[ex["row"], ex["pos"], t, a] for ex, t, a in zip(exs, t_rows, a_rows, strict=True)]
        for rec, c in zip(out, center.tolist(), strict=True):
            if c != self.before:
                rec.append(c)
        return scale, out

    def unit(self, f: dict, tags: int) -> tuple[dict, str]:
        """(the unit's record in its shard (short keys), its search codes)."""
        top = list(f.get("top") or ())
        ivs = [iv for iv in f.get("intervals") or () if iv.get("examples")]
        scale, ctx = self.contexts(top + [ex for iv in ivs for ex in iv["examples"]],
                                   f.get("max_act"))
        hist = f.get("hist") or {}
        logits = f.get("logits") or {}
        abl = f.get("ablation")
        rec: dict[str, Any] = {
            "i": f["id"], "d": sig(f.get("density")), "m": sig(f.get("mean_act")),
            "x": sig(f.get("max_act")), "s": scale, "t": tags,
            "h": [sig(hist.get("lo")), sig(hist.get("hi")), list(hist.get("counts") or ()),
                  1 if hist.get("estimated") else 0],
            "lt": [[int(t), sig(v)] for t, v in logits.get("top") or ()],
            "lb": [[int(t), sig(v)] for t, v in logits.get("bottom") or ()],
            "ab": None if not abl else [sig(abl.get("delta_logp_all")),
                                        sig(abl.get("delta_logp_active")),
                                        abl.get("contexts")],
            "top": ctx[:len(top)], "iv": [],
        }
        j = len(top)
        for iv in ivs:
            k = len(iv["examples"])
            rec["iv"].append([sig(iv.get("lo")), sig(iv.get("hi")), ctx[j:j + k]])
            j += k
        ip = f.get("interp")
        if ip:
            rec["ip"] = {"kind": ip.get("kind"), "tokens": [int(t) for t in ip.get("tokens") or ()],
                         **{k: sig(ip.get(k)) for k in ("precision", "recall", "f1", "auroc")}}
        nb = f.get("neighbours")
        if nb:
            rec["nb"] = {k: [[int(j), sig(v)] for j, v in nb.get(k) or ()]
                         for k in ("decoder", "coact")}
        return rec, self._search(top, [c[2] for c in ctx[:len(top)]])

    def _search(self, top: list[dict], codes: list[str]) -> str:
        """The token codes of the top contexts, overlapping windows in a row merged into one
        segment; segments joined by dots."""
        w = self.tok_digits
        rows: dict[int, list[tuple[int, str]]] = {}
        for ex, s in zip(top, codes, strict=True):
            rows.setdefault(ex["row"], []).append((ex["pos"] - ex["center"], s))
        segs = []
        for items in rows.values():
            items.sort()
            start, cur = items[0]
            for s0, s in items[1:]:
                end = start + len(cur) // w
                if s0 <= end:  # overlaps or touches the segment
                    cur += s[(end - s0) * w:]
                else:
                    segs.append(cur)
                    start, cur = s0, s
            segs.append(cur)
        return ".".join(segs)


def index_columns(stats: dict, tags: list[int]) -> dict[str, list]:
    """The index's columns (one entry per unit)."""
    feats = stats["features"]
    n = len(feats)
    dens = stats.get("density") or [f.get("density") for f in feats]
    mact = stats.get("mean_act_active") or [None] * n
    cols: dict[str, list] = {"id": [], "density": [], "mean_act_active": [], "max_act": [],
                             "top_token": [], "logits": [], "tags": tags}
    kinds, itoks, auroc = [], [], []
    for i, f in enumerate(feats):
        cols["id"].append(f["id"])
        cols["density"].append(sig(dens[i]))
        cols["mean_act_active"].append(sig(mact[i]))
        cols["max_act"].append(sig(f.get("max_act")))
        top = f.get("top") or ()
        cols["top_token"].append(top[0]["tokens"][top[0]["center"]] if top else -1)
        cols["logits"].append([int(t) for t, _ in ((f.get("logits") or {}).get("top") or ())[:5]])
        ip = f.get("interp") or None
        kinds.append(ip.get("kind") if ip else None)
        itoks.append([int(t) for t in ip.get("tokens") or ()] if ip else [])
        auroc.append(sig(ip.get("auroc"), 3) if ip else None)
    if any(k is not None for k in kinds):
        cols.update(interp_kind=kinds, interp_tokens=itoks, auroc=auroc)
    return cols


def interp_aurocs(stats: dict) -> list[float]:
    """The finite held-out AUROCs of the units that have an interpretability score."""
    out = []
    for f in stats["features"]:
        v = sig((f.get("interp") or {}).get("auroc"), 6)
        if v is not None:
            out.append(v)
    return out
