"""Kafka side of exemplar: message contracts, consumer/producer adapters, the embedded broker.

Depends only on ``model.errors`` of this project; ``daemon`` wires it to the model.
"""
