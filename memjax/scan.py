"""python -m memjax.scan: the whitebox denoising confidence score of every caption.

    python -m memjax.scan --model=DIR --prompts=FILE --workdir=DIR [--seeds=0,1,2,3]
    python -m memjax.scan --flagfile=configs/<name>.flags

One UNet step per caption (docs/method.md section 2), batched under jit over the
local devices; results in WORKDIR/scan/ (`memjax.stages.scan`). Rerun the same
command to resume; other settings are refused unless --overwrite.
"""
import os

from memjax.cli import command
from memjax.cli import options
from memjax.stages import scan

OPTIONS = options.common(
    "model", *options.MODEL_FILE, "prompts", "workdir",
    "prompt_column", "csv_delimiter", "batch_size", "seeds",
    "guidance_scale", "dtype", "attention", "noise", "max_prompts", "top_k", "shard_size",
    "overwrite", "log_interval_s", "devices", *options.DETECTORS)
define, build = command.simple(scan.ScanConfig, OPTIONS)


def summary(m) -> str:
  return (f"scan done: {m.counts['scored']} scored, skipped {m.counts['skipped'] or 'none'}, "
          f"{m.rate or 0.0:.1f} prompts/s; results in "
          f"{os.path.join(m.config['workdir'], scan.STAGE)}")


if __name__ == "__main__":
  command.main(define, build, scan.run, summary)
