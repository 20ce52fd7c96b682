"""mmjax: multimodal models (encoders, resamplers, unified decoders) in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="mmjax",
    version="0.1.0",
    description="Multimodal research models in JAX/Flax: CLIP to unified decoders",
    python_requires=">=3.11",
    packages=find_packages(include=["mmjax", "mmjax.*"]),
    install_requires=[
        "jax>=0.7.1",
        "flax>=0.11",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.12",
        "array_record>=0.7",
        "sentencepiece>=0.2",
        "ml_collections>=1.0",
        "einops>=0.8",
        "chex>=0.1.89",
        "tqdm>=4.66",
        "numpy>=1.26",
        "pillow>=10",
        "scikit-learn>=1.4",
        "scikit-image>=0.22",
    ],
    extras_require={
        # torch, transformers and open_clip build the small random reference models that the
        # converters' parity tests import; nbclient runs the notebooks; tensorboardX's protobufs
        # check the event files mmjax writes; jax[tpu] brings libtpu, whose compile-only TPU
        # devices let the tests compile the Mosaic kernels and sharded steps for TPU pods.
        "test": [
            "jax[tpu]>=0.7.1",
            "pytest>=8",
            "pytest-xdist>=3.5",
            "hypothesis>=6.100",
            "ruff>=0.6",
            "torch>=2.4",
            "torchvision>=0.19",
            "transformers>=4.40",
            "open_clip_torch>=2.24",
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
            "matplotlib>=3.8",
            "tensorboardX>=2.6",
            "tokenizers>=0.19",
        ],
        "bench": [
            "torch>=2.4",
            "torchvision>=0.19",
            "open_clip_torch>=2.24",
            "transformers>=4.40",
            "transfusion-pytorch>=0.20",
        ],
        # The importers (mmjax.convert): HF causal LMs and big_vision SigLIP read their files with
        # numpy alone and need `tokenizers` for a tokenizer.json; CLIP/SigLIP, BLIP-2 and LLaVA
        # read through transformers (torch), open_clip checkpoints through open_clip.
        "convert": [
            "tokenizers>=0.19",
            "torch>=2.4",
            "transformers>=4.40",
            "open_clip_torch>=2.24",
        ],
        "tfds": ["tensorflow-datasets>=4.9.7"],
        "gpu": ["jax[cuda12]>=0.7.1"],
        "tpu": ["jax[tpu]>=0.7.1"],
        "tensorboard": ["tensorboard>=2.15"],
    },
)
