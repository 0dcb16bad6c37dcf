"""perceivers-jax: PerceiverS (Perceiver AR + Effective Segmentation + Multi-Scale
cross-attention) for long expressive symbolic piano music, in JAX/Flax."""

import setuptools

REQUIRED = [
    "jax>=0.7",
    "flax>=0.11",
    "optax",
    "orbax-checkpoint",
    "tensorflow-datasets>=4.9.8",
    "note-seq",
    "ml-collections",
    "absl-py",
    "grain>=0.2.12",
    "array-record",
    "numpy",
    "scipy",
    "matplotlib",
    "pillow",  # piano rolls (perceivers_jax/data/piano_roll.py)
    "tqdm",
    "tensorboardX",
    "safetensors>=0.8",  # bfloat16 round trips exactly
]

setuptools.setup(
    name="perceivers-jax",
    version="0.1.0",
    description=" ".join(__doc__.split()),  # one line: a summary holds no newline
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["perceivers_jax*", "data_prep*"]),
    install_requires=REQUIRED,
    extras_require={
        "test": ["pytest", "hypothesis", "pretty_midi"],
        # Optional tf.data path; nothing else needs TensorFlow.
        "tf": ["tensorflow-cpu"],
        "gpu": ["jax[cuda12]"],
        # TPU VMs; on any host also what compiles for TPU topologies (`make test` pins it to
        # the installed jax: jax[tpu]==<jax.__version__>).
        "tpu": ["jax[tpu]"],
    },
    entry_points={
        "console_scripts": [
            "perceivers-tokens=perceivers_jax.cli.tokens:run",
            "perceivers-build-data=perceivers_jax.cli.build_data:run",
            "perceivers-train=perceivers_jax.cli.train:run",
            "perceivers-sample=perceivers_jax.cli.sample:run",
            "perceivers-evaluate=perceivers_jax.cli.evaluate:run",
            "perceivers-export=perceivers_jax.cli.export:run",
            "perceivers-demo=perceivers_jax.cli.demo:run",
            "perceivers-reproduce=perceivers_jax.cli.reproduce:run",
        ],
    },
)
