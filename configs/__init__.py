"""The recipes: one config file per training setup (see each file's docstring).

Installed with the package as ``dynamixer_jax.configs``, so ``dynamixer_jax.recipes.path(name)``
finds them outside a checkout too; in a checkout, ``configs/NAME.py`` is the path to use.
"""
