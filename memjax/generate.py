"""python -m memjax.generate: multi-step regeneration (Heun or DDIM) for ground truth.

    python -m memjax.generate --model=DIR --prompts=FILE_OR_WORKDIR --workdir=DIR \\
        [--sampler=heun|ddim] [--steps=32] [--seeds=0,1,2,3] [--top_k=N]
        [--detectors=wen_steps,bright_ending --wen_steps=50]  (with --sampler=ddim)

docs/method.md section 4. Given a workdir as --prompts, its blackbox's top K by
`edge_scores` (else its scan's by `scores`) are regenerated. Results in
WORKDIR/generate/ (`memjax.stages.generate`).
"""
import os

from memjax.cli import command
from memjax.cli import options
from memjax.cli.options import Opt
from memjax.method import sampling
from memjax.stages import generate

OPTIONS = options.common(
    "model", *options.MODEL_FILE, "prompts", "workdir",
    "prompt_column", "csv_delimiter", "batch_size", "seeds",
    "guidance_scale", "dtype", "attention", "noise", "max_prompts", "top_k", "shard_size",
    "overwrite", "log_interval_s", "devices") + [
        Opt("sampler", "Multi-step sampler: k-diffusion Heun (the reference) or DDIM.",
            choices=sampling.SAMPLERS),
        Opt("steps", "Sampler steps (Heun: 2 * steps - 1 UNet calls)."),
        Opt("sigma_interpolation", "Heun's sigmas: linear (diffusers' LMS list, the "
            "reference) or log (k-diffusion's get_sigmas).", choices=("linear", "log")),
        Opt("detectors", "Multi-step detectors read along each image's DDIM trajectory "
            "(needs --sampler=ddim), one column each in generated.parquet: wen_steps (Wen "
            "et al., mean of ||e_c - e_u|| over the first --wen_steps steps), bright_ending "
            "(Chen et al., the EOS-attention-masked norm over every step); all: both."),
        Opt("wen_steps", "wen_steps: the number of first DDIM steps averaged."),
    ]
define, build = command.simple(generate.GenerateConfig, OPTIONS)


def summary(m) -> str:
  return (f"generate done: {m.counts['images']} images of {m.counts['prompts']} prompts "
          f"({m.details['sampler']}, {m.details['steps']} steps), {m.rate or 0.0:.2f} "
          f"images/s; table "
          f"{os.path.join(m.config['workdir'], generate.STAGE, 'generated.parquet')}")


if __name__ == "__main__":
  command.main(define, build, generate.run, summary)
