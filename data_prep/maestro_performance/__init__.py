"""`maestro_performance` TFDS dataset (importing this registers the builder)."""

from data_prep.maestro_performance.maestro_performance_dataset_builder import Builder
from data_prep.maestro_performance.maestro_performance_dataset_builder import build
from data_prep.maestro_performance.maestro_performance_dataset_builder import LayoutError
from data_prep.maestro_performance.maestro_performance_dataset_builder import make_config
