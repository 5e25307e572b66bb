"""Pinned-feature sampling: continue a prompt with one SAE feature clamped (or added).

    python launch/steer.py --workdir=runs/sae/tiny --feature=123 --value=10 \
        --prompt="def main(" --num_tokens=64 --num_samples=3

Prints the baseline and the steered continuations (same random keys), or JSON with
``--json``. ``--value`` pins the feature's activation (SAE units, i.e. after the input
normalisation the SAE was trained with); ``--scale`` instead adds that multiple of the
feature's decoder direction.

The dictionary comes from an SAE training run (``--workdir``, latest checkpoint or
``--step``), whose run record names the LM and token store, or from an export
(``--sae=file.npz``, :func:`saejax.sae.bundle.save_bundle`), whose ``extra`` metadata may
name ``lm_dir`` and ``store_dir``, or a SAELens SAE folder (``--sae=folder``,
:func:`saejax.interop.saelens.load_saelens`; give ``--lm_dir`` and ``--store_dir``).
``--lm_dir`` / ``--store_dir`` override either.

Only the results go to stdout and only warnings and one-line errors to stderr (absl INFO
lines, e.g. orbax's restore log, are off unless ``--verbosity=0``).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from saejax import cli  # noqa: E402

flags.DEFINE_string("workdir", None, "SAE training workdir (saejax.train checkpoints)")
flags.DEFINE_integer("step", None, "checkpoint step of --workdir (default latest)")
flags.DEFINE_string("sae", None, "SAE export (.npz, saejax.sae.bundle.save_bundle) or "
                    "SAELens SAE folder instead of --workdir")
flags.DEFINE_string("lm_dir", None, "LM training workdir or local HF checkpoint directory "
                    "(GPT-2, GPT-NeoX, Llama; default: the SAE export's extra['lm_dir'])")
flags.DEFINE_string("store_dir", None, "token store whose tokenizer to use (default: the "
                    "SAE export's extra['store_dir'], else the LM checkpoint's store_dir)")
flags.DEFINE_integer("feature", None, "feature id to steer", required=True)
flags.DEFINE_float("value", None, "clamp the feature to this activation (SAE units)")
flags.DEFINE_float("scale", None, "add this multiple of the feature's decoder direction")
flags.DEFINE_string("prompt", "\n", "prompt text")
flags.DEFINE_integer("num_tokens", 64, "tokens to generate (capped by the model's max_len)")
flags.DEFINE_integer("num_samples", 1, "continuations per setting")
flags.DEFINE_float("temperature", 1.0, "sampling temperature (<= 0: greedy)")
flags.DEFINE_integer("top_k", 0, "sample among the k most likely tokens (0: all)")
flags.DEFINE_integer("seed", 0, "sampling seed (shared by baseline and steered runs)")
flags.DEFINE_bool("json", False, "print one JSON object instead of text")

FLAGS = flags.FLAGS


def load_inputs(sae_path: str | None, workdir: str | None, step: int | None,
                lm_dir: str | None, store_dir: str | None):
    """(lm, sae bundle, tokenizer): an export file or a training run, paths overridable."""
    from saejax.data.tokenizer import load_tokenizer
    from saejax.lm.restore import load_lm
    from saejax.record import load_sae
    from saejax.sae.bundle import load_bundle

    try:
        if sae_path and os.path.isdir(sae_path):
            from saejax.interop.saelens import load_saelens

            sae, _ = load_saelens(sae_path)
            extra = {}
        elif sae_path:
            sae, extra = load_bundle(sae_path)
        else:
            sae, record = load_sae(workdir, step=step)
    except (FileNotFoundError, ValueError) as e:  # nothing there, or not an SAE export / run
        if isinstance(e, cli.ConfigError):
            raise
        raise cli.UsageError(f"--{'sae' if sae_path else 'workdir'}: {e}") from None
    if not sae_path:
        extra = {} if record.lm is None else {"lm_dir": record.lm.dir,
                                              "store_dir": record.lm.token_store,
                                              "lm_step": None if lm_dir else record.lm.step}
    if sae.site is None:
        raise cli.UsageError("the dictionary names no LM site (it was trained on activations "
                             "alone); steering needs one")
    lm_dir = lm_dir or extra.get("lm_dir")
    if not lm_dir:
        raise cli.UsageError("no LM: pass --lm_dir (the SAE export names none)")
    try:
        model, meta = load_lm(lm_dir, step=extra.get("lm_step"))
    except FileNotFoundError as e:
        raise cli.UsageError(f"--lm_dir: {e}") from None
    store_dir = store_dir or extra.get("store_dir") or meta.get("store_dir")
    if not store_dir:
        raise cli.UsageError("no tokenizer: pass --store_dir (a token store directory)")
    return model, sae, load_tokenizer(store_dir)


def quiet_logs() -> None:
    """Only results and one-line errors: no orbax restore chatter, no INFO lines (jax's
    backend probing, ...); warnings stay. ``--verbosity=0`` brings the INFO lines back."""
    from absl import logging

    from saejax.metrics import quiet_orbax_logs

    quiet_orbax_logs()
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def main(argv):
    del argv
    quiet_logs()
    from saejax.analysis.steering import steer_text

    if (FLAGS.value is None) == (FLAGS.scale is None):
        raise cli.UsageError("give exactly one of --value (clamp) or --scale (add)")
    if (FLAGS.sae is None) == (FLAGS.workdir is None):
        raise cli.UsageError("give exactly one of --workdir (an SAE run) or --sae (an export)")
    model, sae, tokenizer = load_inputs(FLAGS.sae, FLAGS.workdir, FLAGS.step, FLAGS.lm_dir,
                                        FLAGS.store_dir)
    if not 0 <= FLAGS.feature < sae.n_features:
        raise cli.UsageError(f"--feature={FLAGS.feature} is out of range: the dictionary has "
                             f"{sae.n_features} features (0 .. {sae.n_features - 1})")
    out = steer_text(model, sae, tokenizer, FLAGS.prompt, feature=FLAGS.feature,
                     value=FLAGS.value, scale=FLAGS.scale, num_tokens=FLAGS.num_tokens,
                     num_samples=FLAGS.num_samples, temperature=FLAGS.temperature,
                     top_k=FLAGS.top_k, seed=FLAGS.seed)
    how = (f"clamped to {FLAGS.value}" if FLAGS.value is not None
           else f"decoder direction added x{FLAGS.scale}")
    if FLAGS.json:
        print(json.dumps({"feature": FLAGS.feature, "steering": how, "prompt": FLAGS.prompt,
                          **out}))
        return
    print(f"prompt: {FLAGS.prompt!r}\nfeature {FLAGS.feature} {how}\n")
    for name in ("baseline", "steered"):
        for i, text in enumerate(out[name]):
            print(f"--- {name} {i} ---\n{text}\n")


if __name__ == "__main__":
    cli.run("steer", main)
