"""One file per experiment, each with `get_config(arg)` and its command in the docstring
(`--config=perceivers_jax/configs/NAME.py[:variant]`); installed with the package, so the
commands' defaults exist outside a checkout."""
