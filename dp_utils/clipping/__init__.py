"""The clipping engine: exact per-example norms and clipped gradient sums, one small file per layer rule."""
