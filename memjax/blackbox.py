"""python -m memjax.blackbox: edge consistency of one-step samples, or of your images.

    python -m memjax.blackbox --model=DIR --prompts=FILE_OR_WORKDIR --workdir=DIR \\
        [--top_k=N] [--seeds=0,1,2,3] [--save_images] [--noise=FILE.npy]
    python -m memjax.blackbox --images=DIR_OR_TABLE --workdir=DIR

docs/method.md section 3. Given a workdir as --prompts, its scan's top K by
`scores` are attacked. Results in WORKDIR/blackbox/ (`memjax.stages.blackbox`).
"""
import os

from memjax.cli import command
from memjax.cli import options
from memjax.cli.options import Opt
from memjax.stages import blackbox

OPTIONS = options.common(
    "workdir", "model", *options.MODEL_FILE, "prompts",
    "prompt_column", "csv_delimiter", "batch_size", "seeds",
    "guidance_scale", "dtype", "attention", "noise", "max_prompts", "top_k", "shard_size",
    "overwrite", "log_interval_s", "devices") + [
        Opt("images", "External images instead of --model/--prompts: a folder with one "
            "subfolder per prompt (caption: its prompt.txt or its name), or a table with "
            "caption and image-path columns."),
        Opt("save_images", "Write the one-step samples as PNGs under "
            "WORKDIR/blackbox/images/<prompt_id>/<seed>.png."),
        Opt("edge_threshold", "Sobel magnitude (summed over RGB) above which a pixel is an "
            "edge."),
        Opt("edge_consistency", "A consistent edge: mean over the images' edge maps above "
            "this."),
        Opt("image_column", "Image-path column of an --images table."),
        Opt("max_image_pixels", "External images with more pixels are skipped (too_large)."),
        Opt("edge_workers", "Host threads for images (0: one per core)."),
    ]
define, build = command.simple(blackbox.BlackboxConfig, OPTIONS)


def summary(m) -> str:
  return (f"blackbox done: {m.counts['scored']} scored, skipped "
          f"{m.counts['skipped'] or 'none'}; results in "
          f"{os.path.join(m.config['workdir'], blackbox.STAGE)}")


if __name__ == "__main__":
  command.main(define, build, blackbox.run, summary)
