"""Exemplar model core: the classifier, its exemplar store, admission and evaluation.

Nothing here imports ``streams`` or ``daemon``; those wire this package up.
"""
