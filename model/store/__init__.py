"""Exemplar stores: the interface in ``base`` and its Qdrant back ends."""

from model.store.base import Exemplar, ExemplarStore, Neighbor

__all__ = ["Exemplar", "ExemplarStore", "Neighbor"]
