"""The `maestro_performance` TFDS dataset as it lies on disk: its names and the lengths file
beside its records.

`data_prep/maestro_performance` builds it and is the only importer of the builder (importing
it registers the builder with TFDS). Reading needs no builder code: `tfds.builder(name,
data_dir=...)` opens a built dataset from its files, so `data/` never imports `data_prep`.
"""

NAME = "maestro_performance"
CONFIG_NAMES = ("full", "folder_full")  # MAESTRO v3 layout | any folder of MIDI files
DATASETS = tuple(f"{NAME}/{config}" for config in CONFIG_NAMES)
# {split: [num_tokens of each record, in record order]} in a build's folder.
LENGTHS_FILE = "num_tokens.json"
