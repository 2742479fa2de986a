"""python -m memjax.index: CLIP embeddings of the training images and a FAISS index.

    python -m memjax.index --images=TABLE --workdir=DIR [--embedder=ViT-L-14@openai \\
        --embedder_checkpoint=FILE] [--index_factory=Flat] [--nprobe=N]
    python -m memjax.index --embeddings=LAION_EMB_DIR --workdir=DIR --index_factory=IVF65536,PQ64

docs/method.md section 5. Results in WORKDIR/index/ (`memjax.stages.index`).
"""
from memjax.cli import command
from memjax.cli import options
from memjax.cli.options import Opt
from memjax.stages import index

OPTIONS = options.common("workdir") + [
    Opt("images", "Training-image table: `url` and/or `image_path`, `caption`, optional "
        "`index` (the image's id in its training set)."),
    Opt("embeddings", "Folder of precomputed embeddings: img_emb/img_emb_<n>.npy + "
        "metadata/metadata_<n>.parquet (LAION layout)."),
    Opt("embedder", "open_clip image encoder: ARCH or ARCH@TAG (weights from "
        "--embedder_checkpoint; the TAG only selects preprocessing and activation, nothing "
        "is downloaded), random:ARCH (random weights) or random (a tiny random ViT)."),
    Opt("embedder_checkpoint", "Local open_clip checkpoint file for --embedder (.bin, .pt, "
        ".pth, .safetensors)."),
    Opt("index_factory", "FAISS index-factory string (Flat, IVF4096,Flat, IVF65536,PQ64, "
        "...); inner product on unit vectors."),
    Opt("nprobe", "IVF lists visited per query (IVF index factories only)."),
    Opt("batch_size", "Images per encoder batch."),
    Opt("max_images", "Embed only the first N rows of --images."),
    Opt("chunk_rows", "Images per embeddings file (and per resumable chunk)."),
    Opt("max_train", "Vectors drawn to train an index that needs training."),
] + options.common("csv_delimiter", "overwrite", "log_interval_s")
define, build = command.simple(index.IndexConfig, OPTIONS)


def summary(m) -> str:
  return (f"index done: {m.details['ntotal']} vectors ({m.details['index_factory']}, width "
          f"{m.details['dim']}); images {m.counts.get('status') or 'none'}; in "
          f"{m.config['workdir']}/index")


if __name__ == "__main__":
  command.main(define, build, index.run, summary)
