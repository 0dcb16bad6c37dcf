"""Paper-size defaults shared by every experiment config in `perceivers_jax/configs/`.

Each `perceivers_jax/configs/*.py` starts from `base_config()` and changes what its experiment
changes,
as big_vision's configs start from `big_vision.configs.common`.
"""

import copy

import ml_collections


class InputError(Exception):
  """Bad input the user can fix (a file, flag or config field): the message names it and the
  fix. The command-line tools print it as one line, without a traceback (cli/logs.py)."""


class ConfigError(InputError, ValueError):
  """A config value that cannot work; the message names the field."""


def fail(field: str, value, why: str) -> None:
  raise ConfigError(f"config.{field}={value!r}: {why}")

# 0 in `cross_attention_scales` means "full context" (ml_collections lists cannot hold None).
FULL_CONTEXT = 0

# The paper's three models, then two controls that separate Multi-Scale from its confounds
# (README "Results"). Each differs from PerceiverS (effective windows, cascade [full, W]) in:
PAPER_MODELS = {
    "perceiver_ar": "baseline windows, one full cross-attention (Perceiver AR as published)",
    "effective_segmentation": "effective windows, one full cross-attention",
    "perceivers": "effective windows, Multi-Scale cascade [full, W] (PerceiverS)",
    # PerceiverS's parameter count and depth, no short scale: depth without Multi-Scale.
    "effective_two_full": "effective windows, cascade [full, full]",
    "perceivers_sum": "effective windows, [full, W] summed instead of cascaded",
}


def base_config() -> ml_collections.ConfigDict:
  """PerceiverS at the paper's size: L=32,768, N=1,024, width 1,024, 24 latent layers."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.model = ml_collections.ConfigDict(dict(
      vocab_size=391,
      max_length=32768,  # L: inputs the model attends to.
      num_latents=1024,  # N: queries = the last N inputs; targets per window.
      embed_dim=1024,
      num_heads=16,
      head_dim=64,
      mlp_ratio=4,
      num_latent_layers=24,
      cross_attention_scales=(FULL_CONTEXT, 1024),
      scale_mask="sliding",  # sliding | final_block
      combine="cascade",  # cascade | sum
      dropout_rate=0.1,
      rotary_fraction=0.5,
      max_wavelength=0,  # 0 -> max_length, as Perceiver AR.
      # auto | xla | cudnn | chunked | splash: a runtime choice (model/attention.py:
      # resolve_impl); auto is cuDNN on GPU (bf16, where cuDNN accepts the call), splash on
      # TPU for the forward over left-padded windows, else chunked above one chunk of keys and
      # xla below (the decoder's cached calls never run splash and its one-query steps run
      # xla; `splash` off a TPU is Pallas interpret mode, for tests).
      attention_impl="auto",
      attention_chunk_size=1024,  # keys per step of the chunked kernel (memory ~ chunk)
      # Sliding scales key only the N + W - 1 inputs they can see (False: all L, masked).
      windowed_scales=True,
      dtype="bfloat16",  # activations
      param_dtype="float32",
      remat_policy="nothing_saveable",
      scan_layers=True,
      layer_norm_epsilon=1e-5,  # every LayerNorm; Haiku's default, as Perceiver AR
      # Token embedding init: normal_0.02 | reference (Haiku's hk.Embed: truncated normal, std
      # 1). normal_0.02 trained tiny to a lower validation NLL (README, "Training").
      embedding_init="normal_0.02",
  ))

  config.data = ml_collections.ConfigDict(dict(
      data_dir="",  # TFDS data_dir holding maestro_performance (perceivers-build-data).
      dataset="maestro_performance/full",
      train_split="train",
      eval_split="validation",
      windows="effective",  # effective | baseline
      padding_side="left",
      worker_count=0,  # >0: Grain worker processes (mp_prefetch)
      read_threads=8,
      prefetch_buffer_size=16,
      # Training-only, per piece, seeded per record visit; all off as in the paper.
      augmentation=ml_collections.ConfigDict(dict(
          transpose_range=0,  # semitones uniform in [-r, r]; Music Transformer used 3
          stretch_range=(1.0, 1.0),  # factor uniform in [low, high]; Music Transformer 0.95-1.05
          velocity_shift_range=0,  # velocity bins uniform in [-r, r]
      )),
  ))

  config.train = ml_collections.ConfigDict(dict(
      batch_size=8,  # global, over all hosts
      microbatches=1,
      num_steps=100_000,
      optimizer="adam",  # adam | adamw (perceivers_jax/training/optimizer.py)
      learning_rate=0.03125,
      schedule="rsqrt",
      warmup_steps=10_000,
      b1=0.9,
      b2=0.98,
      weight_decay=0.0,  # AdamW's decoupled decay; needs optimizer="adamw"
      grad_clip_norm=1.0,
      z_loss=1e-4,
      # Update checks (perceivers_jax/training/update_guard.py, README "Training"). An update
      # is rejected when it is non-finite, makes a parameter exceed 1e6, has a global norm
      # above max_update_ratio x the parameters' global norm, or comes with a loss more than
      # loss_spike_sigmas standard deviations above the mean loss of the last
      # loss_spike_window accepted steps (checked once half of them exist); 0 turns a
      # threshold off. A rejected update either "stop"s the run (nothing after the last
      # accepted state is saved) or is "skip"ped (the state stays; train/skipped_updates).
      on_bad_update="stop",
      max_update_ratio=1.0,
      loss_spike_sigmas=6.0,
      loss_spike_window=128,
      # Peak TFLOP/s per device for MFU. 0: flops.PEAK_TFLOPS (datasheet dense bf16), or no MFU
      # for an unlisted device. Set a measured peak here: perceiver-ar's H200 MFU uses 790
      # (measured), against the datasheet's 989.
      peak_tflops=0.0,
      # Fine-tuning. init_from: a `perceivers-export` directory or a training workdir whose
      # parameters (only) start this run when its own workdir has no checkpoint yet.
      init_from="",
      # Parameter groups that get zero updates, e.g. ("embed", "cross_layers"); names in
      # perceivers_jax/model/param_groups.py.
      freeze=(),
  ))

  config.eval = ml_collections.ConfigDict(dict(
      every_steps=5_000,
      batch_size=8,
      max_batches=0,  # 0: the whole split's sequential windows.
      # The music evaluator (perceivers_jax/watch/music.py): at every `every_evals`-th
      # evaluation and after the last step, the same seeds sample pieces from SOS and continue
      # the openings of validation pieces; Table I overlap areas against validation excerpts,
      # repetition and memorisation shares go to TensorBoard, the pieces to WORKDIR/music/STEP.
      music=ml_collections.ConfigDict(dict(
          every_evals=1,  # 0: off
          num_unconditional=8,
          num_continuations=8,  # continuations of validation openings (piece j % pieces)
          primer_tokens=256,  # the opening's first tokens (about 9 s of MAESTRO music)
          num_tokens=2048,  # generated per piece
          batch_size=8,  # pieces sampled together, over all devices of all hosts
          seed=0,
          temperature=1.0,
          top_p=0.95,
          num_reference=16,  # validation excerpts of num_tokens tokens (Table I reference)
          max_train_pieces=0,  # training pieces checked for copies (0: all)
      )),
      max_targets_per_piece=0,  # >0: only each piece's first targets (positions 1..max).
  ))

  # Profiler traces of these train steps (e.g. (101, 102, 103)) into WORKDIR/tensorboard
  # (TensorBoard's profile tab, XProf); a process's first step (compilation) is never traced.
  config.profile = ml_collections.ConfigDict(dict(steps=()))

  # jax's persistent compilation cache (perceivers_jax/runtime/compilation_cache.py):
  # "" = WORKDIR/compilation_cache, "off", or a directory / bucket URL shared by runs. Programs
  # compiling for at least compilation_cache_min_compile_seconds are written (jax's default 1).
  config.compilation_cache_dir = ""
  config.compilation_cache_min_compile_seconds = 1.0

  config.checkpoint = ml_collections.ConfigDict(dict(
      every_steps=1_000,
      keep=3,
      async_save=True,
  ))

  config.log_every_steps = 50

  # Mesh axes and how logical axes map onto them (MaxText style). data/fsdp/tensor split the
  # devices of a slice, dcn_* the slices of a multi-slice job (one -1 per level; BUILD.md
  # section 4). Defaults: data parallelism within and across slices.
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1,
                                               dcn_data=-1, dcn_fsdp=1, dcn_tensor=1))
  config.logical_axis_rules = (
      ("batch", ("data", "fsdp")),
      ("length", None),
      ("latents", None),
      ("embed", "fsdp"),
      ("heads", "tensor"),
      ("kv", None),
      ("mlp", "tensor"),
      ("vocab", "tensor"),
      ("layers", None),
  )
  return config


def paper_model(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """A copy of `config`, a PerceiverS config (scales [full, W]), made into model `name` of
  PAPER_MODELS; everything else (sizes, training, data) stays, so the models differ only where
  PAPER_MODELS says."""
  if name not in PAPER_MODELS:
    raise ConfigError(f"model {name!r}: not one of {', '.join(PAPER_MODELS)}")
  scales = tuple(config.model.cross_attention_scales)
  if (len(scales) != 2 or scales[0] != FULL_CONTEXT or scales[1] == FULL_CONTEXT
      or config.model.combine != "cascade" or config.data.windows != "effective"):
    fail("model.cross_attention_scales", scales,
         f"{name} is derived from a PerceiverS config (effective windows, cascade [full, W], "
         "W > 0), e.g. perceivers_jax/configs/tiny.py or perceivers.py")
  model = copy.deepcopy(config)  # ConfigDict(config) would share the nested dicts.
  if name in ("perceiver_ar", "effective_segmentation"):
    model.model.cross_attention_scales = (FULL_CONTEXT,)
  if name == "perceiver_ar":
    model.data.windows = "baseline"
  elif name == "effective_two_full":
    model.model.cross_attention_scales = (FULL_CONTEXT, FULL_CONTEXT)
  elif name == "perceivers_sum":
    model.model.combine = "sum"
  return model


def paper_config_without_variants(name: str, arg: str | None,
                                  config_file: str) -> ml_collections.ConfigDict:
  """The paper-size config of model `name` (`paper_model` over `base_config`), for a config
  file (`config_file`, named in the error) that takes no `:VARIANT` argument."""
  if arg:
    raise ValueError(f"{config_file} has no variants (got {arg!r}).")
  return paper_model(base_config(), name)
