"""Exports saejax's LM to a Hugging Face GPT-2 folder (config.json + model.safetensors).

    python launch/export_lm_hf.py --lm_dir=runs/lm/paper --out_dir=runs/lm/paper_hf

The folder loads with ``transformers.GPT2LMHeadModel.from_pretrained(out_dir)`` (same logits;
tested). Tools built on transformers' GPT-2 (e.g. TransformerLens, which takes a loaded
``hf_model``) can read it from there; that route is not tested here. See
:mod:`saejax.lm.hf_export`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from saejax import cli  # noqa: E402

flags.DEFINE_string("lm_dir", None, "LM training workdir (launch/train_lm.py)", required=True)
flags.DEFINE_string("out_dir", None, "folder to write", required=True)
flags.DEFINE_integer("step", None, "checkpoint step (default latest)")
flags.DEFINE_string("store_dir", None, "token store whose tokenizer.json to copy (default: the "
                    "checkpoint's)")
flags.DEFINE_bool("overwrite", False, "replace an existing export in --out_dir")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from saejax.lm.hf_export import export_gpt2
    from saejax.metrics import quiet_orbax_logs

    quiet_orbax_logs()

    out = export_gpt2(FLAGS.lm_dir, FLAGS.out_dir, step=FLAGS.step, store_dir=FLAGS.store_dir,
                      overwrite=FLAGS.overwrite)
    print(out)


if __name__ == "__main__":
    cli.run("export_lm_hf", main)
