"""Composing adapters at inference: composition blocks (Stack, Parallel, Average, Fuse),
routing over frozen experts (a trained gate, LoraHub) and retrieval from an adapter library."""
