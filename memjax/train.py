"""python -m memjax.train: trains the bundled tiny Stable Diffusion on a synthetic
data set with planted duplicates (`memjax.testing.training`).

    python -m memjax.train --flagfile=configs/testbed.flags --workdir=DIR
"""
import dataclasses
import json

from absl import flags

from memjax.cli import command
from memjax.cli import options
from memjax.cli.options import Opt
from memjax.testing import testbed
from memjax.testing import training

SPEC_OPTIONS = [Opt(f.name, f"TestbedSpec.{f.name}", flag=f"testbed_{f.name}")
                for f in dataclasses.fields(testbed.TestbedSpec)]
OPTIONS = options.common("workdir") + [
    Opt("seed", "Seed of every weight init and batch.", flag="train_seed"),
    Opt("text_num_merges", "BPE merges kept."),
    Opt("text_hidden_size", "Text encoder width."),
    Opt("text_layers", "Text encoder layers."),
    Opt("vae_channels", "VAE block_out_channels."),
    Opt("vae_steps", "VAE optimizer steps."),
    Opt("vae_batch_size", "VAE batch size."),
    Opt("vae_learning_rate", "VAE peak lr."),
    Opt("vae_kl_weight", "Weight of the KL term."),
    Opt("unet_channels", "UNet block_out_channels."),
    Opt("train_steps", "UNet optimizer steps."),
    Opt("train_batch_size", "UNet batch size."),
    Opt("learning_rate", "UNet peak learning rate."),
    Opt("warmup_steps", "Linear warm-up steps."),
    Opt("cfg_dropout", "P(caption -> empty caption)."),
    Opt("prediction_type", "UNet target.", flag="train_prediction_type",
        choices=("epsilon", "v_prediction")),
    Opt("checkpoint_every", "Steps between checkpoints."),
    Opt("stop_after", "Stop after this many steps (vae + unet).", flag="train_stop_after"),
    Opt("evaluate", "Score eval_prompts.parquet at the end.", flag="train_evaluate"),
]


def define(fv: flags.FlagValues = flags.FLAGS) -> None:
  options.define(testbed.TestbedSpec, SPEC_OPTIONS, fv)
  options.define(training.TrainConfig, OPTIONS, fv)


def build(fv: flags.FlagValues = flags.FLAGS) -> training.TrainConfig:
  spec = options.build(testbed.TestbedSpec, SPEC_OPTIONS, fv)
  return options.build(training.TrainConfig, OPTIONS, fv, spec=spec)


def summary(result) -> str:
  if not result.get("finished"):
    return "train: stopped early (--train_stop_after); rerun the same command to go on"
  brief = {k: v for k, v in result.items() if k != "curve"}
  if "eval" in brief:
    brief["eval"] = {k: v for k, v in brief["eval"].items() if k != "rows"}
  return json.dumps(brief, indent=1)


if __name__ == "__main__":
  command.main(define, build, training.run, summary)
