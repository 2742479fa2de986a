"""python -m memjax.verify: TV / MV / RV / N labels of the generated images.

    python -m memjax.verify --generated=GEN_WORKDIR --index=INDEX_WORKDIR --workdir=DIR [--k=16]

docs/method.md sections 5 to 7. Results in WORKDIR/verify/ (`memjax.stages.verify`).
"""
import os

from memjax.cli import command
from memjax.cli.options import Opt
from memjax.cli import options
from memjax.stages import verify

OPTIONS = [
    Opt("generated", "Workdir of memjax.generate (its generate/generated.parquet)."),
    Opt("index", "Workdir of memjax.index (its FAISS index and metadata)."),
] + options.common("workdir") + [
    Opt("k", "Nearest training images retrieved per generated image."),
    Opt("nprobe", "IVF lists visited per query (default: the index's)."),
    Opt("embedder", "Query encoder (default: the one the index was built with)."),
    Opt("embedder_checkpoint", "Its checkpoint (default: the index's)."),
    Opt("batch_size", "Images per encoder batch."),
    Opt("tv_threshold", "TV: masked SSE / mean(mask) below this."),
    Opt("mv_threshold", "MV: SSE to the own training image below this."),
    Opt("rv_threshold", "RV: SSE to a retrieved image below this."),
    Opt("template_sse_low", "Template pair: SSE above this (not identical)."),
    Opt("template_sse_high", "Template pair: SSE below this (near-identical)."),
    Opt("template_pixel_tol", "Template mask: summed |q - c| over channels below this."),
    Opt("template_rule", "Template masks from near-duplicate pairs (pair: a varying part of a "
        "few hundred pixels) or from images sharing one layout (group: any size).",
        choices=("pair", "group")),
    Opt("template_agree_low", "Group rule: two images share a layout when they agree on at "
        "least this fraction of pixels."),
    Opt("template_agree_high", "Group rule: ...and on less than this fraction (more: copies, "
        "which say nothing)."),
    Opt("template_min_partners", "Group rule: layout partners an image needs to be a "
        "template."),
] + options.common("max_prompts", "overwrite", "log_interval_s")
define, build = command.simple(verify.VerifyConfig, OPTIONS)


def summary(m) -> str:
  return (f"verify done: {m.counts['prompts']} prompts, labels {m.counts['labels']}, "
          f"{m.counts['templates']} templates; results in "
          f"{os.path.join(m.config['workdir'], verify.STAGE)}")


if __name__ == "__main__":
  command.main(define, build, verify.run, summary, devices=False)
