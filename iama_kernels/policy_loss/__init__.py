"""The clipped-ratio (or another surrogate) + KL token loss of one mirror-descent step."""
