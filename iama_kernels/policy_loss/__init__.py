"""The clipped-ratio + k3-KL token loss of one mirror-descent step."""
