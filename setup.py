"""memjax: extraction of memorized training images from diffusion models, in JAX."""
import setuptools

# Core: everything the attack needs, from scan to report (the CLIP image encoder
# is memjax's own, in Flax; FAISS is the retrieval index). It must import and run
# where only JAX is installed (no torch), e.g. a TPU VM or a bare GPU image.
CORE = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "numpy==2.4.6",
    "absl-py==2.5.1",
    "safetensors==0.8.0",
    "pyarrow==26.0.1",
    "pillow==13.0.0",
    "scipy==1.17.1",
    "regex==2026.11.19",
    "matplotlib==3.11.2",
    "faiss-cpu==1.15.1",
]
# The PyTorch reference implementation (parity tests, cross-check, reading .bin
# and .ckpt checkpoints, open_clip as the image encoder's reference). torch is
# pinned exactly: a range pulls a CUDA build of several GB, and torch 2.13.0 CPU
# cannot run torchvision, which open_clip needs.
REFERENCE = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "diffusers==0.42.1",
    "transformers==5.24.0",
    "open_clip_torch==3.3.0",
]
TEST = ["pytest==9.2.0"]

setuptools.setup(
    name="memjax",
    version="0.1.0",
    description="Extraction of memorized training images from diffusion models (Webster 2023) in JAX/Flax",
    packages=setuptools.find_packages(include=["memjax", "memjax.*"]),
    package_data={"memjax": ["assets/*", "assets/clip_tiny/*", "assets/testbed/*",
                             "assets/testbed/images/*", "assets/testbed/model/*",
                             "assets/testbed/model/*/*"]},
    license_files=["third_party/CLIP/LICENSE"],
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require={"reference": REFERENCE, "test": REFERENCE + TEST, "all": REFERENCE + TEST},
)
