"""Evaluation of a persona adapter against prompting baselines (`convo eval`).

Import-light: the submodules that need torch, scikit-learn or rank-bm25 import them inside their functions.
"""
