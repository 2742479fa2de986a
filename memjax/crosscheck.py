"""python -m memjax.crosscheck: memjax's scores against PyTorch diffusers' on the same
model and noise (a single-file model needs --model_config: diffusers reads it with
`from_single_file(config=...)`).

    python -m memjax.crosscheck --model=DIR --prompts=FILE --workdir=DIR [--n=64] \\
      [--dtype=float32|bfloat16] [--seeds=0] [--noise=FILE.npy] [--blackbox] \\
      [--detectors=all|wen981,jeon,asthana,ren_le,wen_steps,bright_ending] [--steps=50]

Results in WORKDIR/crosscheck/ (`memjax.stages.crosscheck`); needs memjax[reference].
"""
import os

from memjax.cli import command
from memjax.cli import options
from memjax.cli.options import Opt
from memjax.stages import crosscheck

OPTIONS = options.common("model", *options.MODEL_FILE, "prompts", "workdir") + [
    Opt("n", "Number of captions to cross-check."),
] + options.common("prompt_column", "csv_delimiter", "seeds", "guidance_scale", "dtype",
                   "attention", "noise", "batch_size", "ren_layer", "detector_protocol",
                   "detector_generations", "detector_seed") + [
    Opt("blackbox", "Also compare the one-step images (4 seeds unless --seeds names 2 or "
        "more) and their edge scores."),
    Opt("detectors", "Also compare published detectors: the one-step ones of memjax.scan "
        "(wen981, jeon, asthana, ren_le) and the trajectory ones of memjax.generate "
        "(wen_steps, bright_ending: DDIM of --steps steps, per prompt and seed); all: every "
        "one of both."),
    Opt("steps", "DDIM steps of the trajectory detectors (wen_steps averages all of them)."),
]
define, build = command.simple(crosscheck.CrossCheckConfig, OPTIONS)


def summary(m) -> str:
  return (f"{m.details['verdict']}\ndetails: "
          f"{os.path.join(m.config['workdir'], crosscheck.STAGE, 'manifest.json')}")


if __name__ == "__main__":
  command.main(define, build, crosscheck.run, summary)
